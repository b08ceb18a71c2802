"""The top-level command: its table of subcommands, --help, short errors, slices, YAML errors, flat keys, progress.

Three tests start the real command in a subprocess (``--help``, a bad target, the demo config redirected to a file);
the rest call ``main`` in-process, which runs the same code after the console script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from lightning_lora.cli import commands, main
from tests.cli.test_cli import _fit_args
from tests.tiny_lm import save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def _cli(*args: str, cwd: Path, python_flags: Sequence[str] = (), stdout: int | None = subprocess.PIPE,
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("LIGHTNING_LORA_DEBUG", None)
    return subprocess.run([sys.executable, *python_flags, "-m", "lightning_lora.cli", *args], check=False, cwd=cwd, env=env,
                          stdout=stdout, stderr=subprocess.PIPE if stdout == subprocess.PIPE else subprocess.STDOUT,
                          text=True, timeout=900)


def _exit_code(args: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


# --------------------------------------------------------------------------------------------- the command table
def test_help_lists_every_command_without_importing_torch_or_lightning(tmp_path: Path) -> None:
    result = _cli("--help", cwd=tmp_path, python_flags=["-X", "importtime"])
    assert result.returncode == 0, result.stderr[-2000:]
    for command in commands.COMMANDS:
        assert re.search(rf"^  {command.name} +{re.escape(command.help)}$", result.stdout, re.MULTILINE)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "lightning_lora.cli.commands" in imported  # the measurement works
    assert not {"torch", "lightning", "transformers", "jsonargparse"} & imported


def hello_main(argv: Sequence[str]) -> None:
    """A stand-in command for the registry test."""
    sys.stdout.write(f"hello {' '.join(argv)}\n")


def test_a_new_command_is_one_table_entry(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    entry = commands.Command("hello", __name__, "hello_main", "Say hello.")
    monkeypatch.setattr(commands, "COMMANDS", (*commands.COMMANDS, entry))
    main(["--help"])
    assert re.search(r"^  hello +Say hello\.$", capsys.readouterr().out, re.MULTILINE)
    main(["hello", "--to", "you"])
    assert capsys.readouterr().out == "hello --to you\n"


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["fitt"]) == 2
    assert "unknown command 'fitt'; did you mean 'fit'?" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- errors
def test_bad_target_fails_before_any_weight_is_read(tiny_model: str, tmp_path: Path) -> None:
    """A model directory without weight files: only planning on the meta device can reach the target error."""
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    args = _fit_args(REPO / "examples/lora_attention.yaml", str(no_weights))
    result = _cli(*args, "--lora.targets", "q_prj", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    err = [line for line in result.stderr.strip().splitlines() if not line.startswith("Seed set to")]
    assert err[0].startswith("lightning-lora fit: error: target pattern 'q_prj' matched no module")
    assert "closest module names: q_proj" in err[0]
    assert err[-1].startswith("See what targets select without loading weights: lightning-lora plan --model")
    assert len(err) <= 3 and "Traceback" not in result.stderr


def test_yaml_slice_syntax_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "late.yaml"
    config.write_text("seed_everything: 0\nlora:\n  r: 8\n  layers: -8:\n")
    assert _exit_code(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:4" in err
    assert 'Quote the slice: layers: "-8:"' in err


@pytest.mark.parametrize("form", [["--lora.layers=-1:"], ["--lora.layers", "-1:"]], ids=["equals", "space"])
def test_negative_slices_work_on_the_command_line(form: list[str], tiny_model: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    main(["plan", "--model", tiny_model, "--lora.targets", "all-linear", *form])
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out
    assert "model.layers.0." not in out


# --------------------------------------------------------------------------------------------- flat keys
def test_plan_help_shows_flat_lora_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora.r R" in out and "--lora.targets TARGETS" in out and "--lora.layers LAYERS" in out
    assert "class_path" not in out


def test_fit_print_config_shows_flat_lora_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    assert _exit_code(["fit", "--config", "examples/qlora.yaml", "--lora.r", "8", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["r"] == 8 and printed["lora"]["alpha"] == 32
    assert printed["quantize"]["quant_type"] == "nf4"
    assert "class_path" not in yaml.safe_dump({"lora": printed["lora"], "quantize": printed["quantize"]})


# --------------------------------------------------------------------------------------------- progress
def test_demo_redirected_to_a_file_prints_progress_lines_and_no_noise(tiny_model: str, tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    args = _fit_args(REPO / "examples/demo.yaml", tiny_model)
    args = [a for a in args if a not in ("--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false")]
    with log.open("w") as out:
        result = _cli(*args, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2",
                      "--data.max_eval_samples", "2", cwd=tmp_path, stdout=out)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "Training: 4 steps (a progress line every 2 steps)" in text
    assert re.search(r"^step 2/4 \| train_loss [\d.]+ \| [\d.]+ (it/s|s/it) \| ETA \d+:\d\d:\d\d$", text, re.MULTILINE)
    assert re.search(r"^step 4/4 \| ", text, re.MULTILINE)
    for noise in ("Epoch 0/-2", "v_num", "Tip: For seamless", "Total FLOPs", "LeafSpec", "is_gradient_checkpointing",
                  "Loading weights:", "Trainer already configured"):
        assert noise not in text
    assert (tmp_path / "out/demo/export/adapter/adapter_config.json").is_file()


def test_debug_switch_shows_the_original_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["plan", "--lora.r", "-3"]) == 2
    assert "r=-3: the rank must be a positive integer" in capsys.readouterr().err
    monkeypatch.setenv("LIGHTNING_LORA_DEBUG", "1")
    with pytest.raises(ValueError, match=r"r=-3: the rank must be a positive integer"):
        main(["plan", "--lora.r", "-3"])


def test_fit_help_names_the_flat_lora_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
    assert "Keys: --lora.r, --lora.alpha, --lora.dropout, --lora.targets," in out
    assert "--quantize.quant_type" in out
