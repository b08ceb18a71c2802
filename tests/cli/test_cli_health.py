"""AdapterHealth is on by default in the CLI, configurable, and can be turned off."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_lora.callbacks import AdapterHealth
from lightning_lora.cli.lightning_cli import LoRACLI
from tests.tiny_lm import save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def _cli(model: str, *extra: str) -> LoRACLI:
    args = ["--config", str(REPO / "examples/lora_attention.yaml"), "--model.model", model,
            "--data.train_file", str(REPO / "examples/data/dates/train.jsonl"), "--trainer.logger", "false", *extra]
    return LoRACLI(args=args, run=False)


def test_health_is_on_by_default(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    health = [cb for cb in _cli(tiny_model).trainer.callbacks if isinstance(cb, AdapterHealth)]
    assert len(health) == 1 and health[0].on_nonfinite == "stop"


def test_health_options_and_off_switch(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    health = [cb for cb in _cli(tiny_model, "--health.on_nonfinite", "skip").trainer.callbacks
              if isinstance(cb, AdapterHealth)]
    assert [h.on_nonfinite for h in health] == ["skip"]
    assert not any(isinstance(cb, AdapterHealth) for cb in _cli(tiny_model, "--health", "null").trainer.callbacks)


def test_cli_run_whose_loss_diverges_stops_at_that_step(tiny_model: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: with the CLI defaults, a run whose loss becomes non-finite stops there, naming the step."""
    from lightning_lora.cli import main
    from lightning_lora.surgery.errors import NonFiniteError

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "examples/lora_attention.yaml"), "--model.model", tiny_model,
            "--data.train_file", str(REPO / "examples/data/dates/train.jsonl"), "--data.val_file",
            str(REPO / "examples/data/dates/val.jsonl"), "--data.max_eval_samples", "1", "--trainer.max_steps", "6",
            "--trainer.enable_progress_bar", "false", "--model.optimizer.init_args.lr", "1e30"]
    with pytest.raises(NonFiniteError, match=r"Non-finite (loss|gradients of .*) at step [1-5]\b"):
        main(args)
