"""Progress for logs (plain lines), step-run labels, and the model summary without FLOPs, on real Trainer runs."""

from __future__ import annotations

import io
import re

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_lora.callbacks import (
    CompactModelSummary,
    LineProgressBar,
    StepRichProgressBar,
)


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        out = super().training_step(batch, batch_idx)
        self.log("train_loss", out["loss"], prog_bar=True)
        return out


def _trainer(callbacks: list, **kwargs) -> L.Trainer:  # type: ignore[type-arg]
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=callbacks,
                     limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def test_line_progress_prints_every_n_steps_with_loss_rate_and_eta() -> None:
    stream = io.StringIO()
    trainer = _trainer([LineProgressBar(every_n_steps=3, stream=stream)], max_steps=7, enable_model_summary=False)
    trainer.fit(LoggingModel())
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Training: 7 steps (a progress line every 3 steps)"
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" | ")[0] for s in steps] == ["step 3/7", "step 6/7", "step 7/7"]  # every 3, and the last
    assert re.fullmatch(r"step 3/7 \| train_loss -?[\d.e+-]+ \| [\d.]+ (it/s|s/it) \| ETA \d+:\d\d:\d\d", steps[0])
    assert lines[-1].startswith("Training done: 7 steps in ")
    assert "v_num" not in stream.getvalue()


def test_line_progress_counts_epochs_when_there_is_no_max_steps() -> None:
    stream = io.StringIO()
    bar = LineProgressBar(every_n_steps=100, stream=stream)
    trainer = _trainer([bar], max_epochs=2, limit_train_batches=3, enable_model_summary=False)
    trainer.fit(LoggingModel())
    assert bar.total_steps(trainer) == 6
    assert [line.split(" | ")[0] for line in stream.getvalue().splitlines() if line.startswith("step")] == ["step 6/6"]


def test_rich_bar_says_training_not_epoch_minus_two_and_hides_v_num() -> None:
    bar = StepRichProgressBar()
    trainer = _trainer([bar], max_steps=2, enable_model_summary=False)
    model = LoggingModel()
    trainer.fit(model)
    assert trainer.max_epochs == -1
    assert bar._get_train_description(0) == "Training"  # Lightning's own label: "Epoch 0/-2"
    metrics = bar.get_metrics(trainer, model)
    assert "train_loss" in metrics and "v_num" not in metrics


def test_model_summary_leaves_out_flops_when_none_were_measured(capsys) -> None:  # type: ignore[no-untyped-def]
    trainer = _trainer([CompactModelSummary()], max_steps=1, enable_progress_bar=False)
    trainer.fit(LoggingModel())
    out = capsys.readouterr().out
    assert re.search(r"^0 \| layer +\| Linear +\| 66 ", out, re.MULTILINE)
    assert "Trainable params: 66 | non-trainable: 0 | total: 66" in out
    assert "FLOPs" not in out
