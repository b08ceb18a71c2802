"""The `lightning-lora` command end to end on a tiny model: every example config, plan, export, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lora.cli import main
from tests.tiny_lm import save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[2]
# fsdp.yaml needs 2 processes: tests/callbacks/test_fsdp.py runs it through the CLI in a subprocess.
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.stem != "fsdp")
TRAIN = str(REPO / "examples/data/dates/train.jsonl")
VAL = str(REPO / "examples/data/dates/val.jsonl")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def _fit_args(config: Path, model: str) -> list[str]:
    return ["fit", "--config", str(config), "--model.model", model, "--data.train_file", TRAIN,
            "--data.val_file", VAL, "--data.max_eval_samples", "4", "--trainer.fast_dev_run", "true",
            "--trainer.enable_progress_bar", "false"]


def test_every_example_config_is_covered() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"demo", "lora_attention", "lora_all_linear", "lora_late_layers", "qlora", "layer_freezing",
            "full_finetune", "prompt_tuning", "p_tuning", "prefix_tuning", "bottleneck"} <= names


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_runs(config: Path, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example trains one step on the tiny model through the CLI and writes its results record."""
    monkeypatch.chdir(tmp_path)
    main(_fit_args(config, tiny_model))
    spec = yaml.safe_load(config.read_text())
    results = [c for c in spec["trainer"]["callbacks"] if c["class_path"].endswith("HeldOutAccuracy")]
    record = json.loads((tmp_path / results[0]["init_args"]["results_file"]).read_text())
    assert 0.0 <= record["accuracy_after"] <= 1.0
    assert 0 < record["trainable_params"] <= record["total_params"]
    if "LayerFreezing" in config.read_text():
        assert record["trainable_params"] < record["total_params"]  # the embeddings at least stay frozen
    elif spec.get("lora") is None and spec.get("peft") is None:
        assert record["trainable_params"] == record["total_params"]  # full fine-tuning
    else:
        assert record["trainable_params"] < record["total_params"] / 2
    exports = [c for c in spec["trainer"]["callbacks"] if c["class_path"].endswith("MergeAndExport")]
    for export in exports:
        assert (tmp_path / export["init_args"]["dirpath"] / "merged" / "config.json").is_file()
        assert (tmp_path / export["init_args"]["dirpath"] / "adapter" / "adapter_config.json").is_file()


def test_lora_config_is_logged_with_the_hyperparameters(tiny_model: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _fit_args(REPO / "examples/lora_attention.yaml", tiny_model)
    args[args.index("--trainer.fast_dev_run") + 1] = "false"
    main([*args, "--trainer.max_steps", "1", "--lora.r", "4"])
    hparams = yaml.safe_load(next((tmp_path / "out/lora_attention").rglob("hparams.yaml")).read_text())
    assert hparams["lora"]["r"] == 4
    assert hparams["lora"]["targets"] == ["q_proj", "v_proj"]


def test_plan_prints_the_table(tiny_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    plan = main(["plan", "--model", tiny_model, "--lora.targets", "all-linear", "--lora.layers", "'-1:'"]) or None
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out
    assert "model.layers.0." not in out
    assert "7 layers" in out
    assert plan is None  # main() returns nothing; the table is the output


def test_export_merges_and_matches_unmerged_logits(tiny_model: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_lora import LoRAConfig, apply_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    apply_lora(model, LoRAConfig(r=4, targets="all-linear"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    main(["export", "--model", tiny_model, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "export")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export/merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() < 1e-4
    report = json.loads((tmp_path / "export/export.json").read_text())
    assert report["max_abs_diff"] < 1e-4


def _exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(args)``, expect exit status 2, return what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_model_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    err = _exit_2(_fit_args(REPO / "examples/lora_attention.yaml", "no/such/model-dir"), capsys)
    assert "no/such/model-dir" in err and "Traceback" not in err


def test_bad_jsonl_is_named_before_training(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "oops"\n')
    monkeypatch.chdir(tmp_path)
    args = _fit_args(REPO / "examples/lora_attention.yaml", tiny_model)
    args[args.index("--data.train_file") + 1] = str(bad)
    assert "bad.jsonl:2" in _exit_2(args, capsys)


def test_unknown_config_key_is_named(tiny_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_2([*_fit_args(REPO / "examples/lora_attention.yaml", tiny_model), "--lora.rank", "8"], capsys)
    assert "unknown option --lora.rank; did you mean --lora.r?" in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_lora_value_is_explained(tiny_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_2([*_fit_args(REPO / "examples/lora_attention.yaml", tiny_model), "--lora.r", "-3"], capsys)
    assert "r=-3: the rank must be a positive integer" in err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err and "Union" not in err


def test_test_subcommand_logs_held_out_metrics(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lightning-lora test` scores the held-out set; TensorBoard logging works from the command line."""
    monkeypatch.chdir(tmp_path)
    args = _fit_args(REPO / "examples/lora_attention.yaml", tiny_model)
    args[0] = "test"
    args += ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir", "tb"]
    args = [a for a in args if a not in ("--trainer.fast_dev_run", "true")]
    args += ["--trainer.limit_test_batches", "1"]
    main(args)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event file"


def test_predict_subcommand_returns_answers(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_lora.cli.lightning_cli import LoRACLI

    monkeypatch.chdir(tmp_path)
    fit_args = _fit_args(REPO / "examples/lora_attention.yaml", tiny_model)
    args = [a for a in fit_args if a not in ("--trainer.fast_dev_run", "true")]
    args[0] = "predict"
    cli = LoRACLI(args=[*args, "--trainer.limit_predict_batches", "1"])
    rows = [row for batch in cli.trainer.predict_loop.predictions for row in batch]
    assert rows and {"prediction", "answer"} <= set(rows[0])


def test_peft_selects_the_method_and_lora_beside_it_is_refused(tiny_model: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _fit_args(REPO / "examples/prefix_tuning.yaml", tiny_model)
    args[args.index("--trainer.fast_dev_run") + 1] = "false"
    main([*args, "--trainer.max_steps", "1", "--peft.num_virtual_tokens", "4"])
    hparams = yaml.safe_load(next((tmp_path / "out/prefix_tuning").rglob("hparams.yaml")).read_text())
    assert hparams["peft"]["class"] == "PrefixTuningConfig" and hparams["peft"]["num_virtual_tokens"] == 4
    with pytest.raises(ValueError, match=r"(?s)Both `lora:`.*and `peft:` \(PrefixTuningConfig\).*HINT: keep `peft:`"):
        main([*_fit_args(REPO / "examples/prefix_tuning.yaml", tiny_model), "--lora.r", "4"])
