"""Damaged checkpoints end in a clear error naming the file (truncated) or the tensors (NaN), in every loading path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import CheckpointMismatchError, LoRAFinetuning
from lightning_lora.surgery.errors import CheckpointFileError
from tests.callbacks.models import TinyModule, trainer

LORA = LoRAConfig(r=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    saver = ModelCheckpoint(dirpath=out, filename="good", save_last=False)
    run = trainer(out, [LoRAFinetuning(LORA, module="model"), saver], max_steps=2, enable_checkpointing=True)
    run.fit(TinyModule())
    return out / "good.ckpt"


@pytest.fixture(params=[0.25, 0.6, 0.99], ids=lambda f: f"{f:.0%}")
def truncated(request: pytest.FixtureRequest, checkpoint: Path, tmp_path: Path) -> Path:
    data = checkpoint.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * request.param)])
    return path


def _message(path: Path) -> str:
    return rf"{path.name}'?: the checkpoint is truncated or corrupt"


def test_fit_resume_from_truncated_checkpoint_names_the_file(truncated: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointFileError, match=_message(truncated)):
        trainer(tmp_path, [LoRAFinetuning(LORA, module="model")], max_steps=3).fit(TinyModule(), ckpt_path=truncated)


def test_from_checkpoint_and_load_checkpoint_name_the_truncated_file(truncated: Path) -> None:
    with pytest.raises(CheckpointFileError, match=_message(truncated)):
        LoRAFinetuning.from_checkpoint(truncated)
    with pytest.raises(CheckpointFileError, match=_message(truncated)):
        LoRAFinetuning(LORA, module="model").load_checkpoint(TinyModule(), truncated)


def test_empty_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=r"empty\.ckpt'?: the checkpoint is empty"):
        LoRAFinetuning.from_checkpoint(path)


@pytest.fixture
def nan_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    data = torch.load(checkpoint, weights_only=True)
    data["state_dict"]["model.layers.1.v_proj.lora_B.default"][0, 0] = math.nan
    path = tmp_path / "nan.ckpt"
    torch.save(data, path)
    return path


def test_resume_from_nan_adapter_checkpoint_is_refused(nan_checkpoint: Path, tmp_path: Path) -> None:
    module = TinyModule()
    with pytest.raises(CheckpointMismatchError, match=r"inf or NaN(.|\n)*model\.layers\.1\.v_proj\.lora_B\.default"):
        trainer(tmp_path, [LoRAFinetuning(LORA, module="model")], max_steps=3).fit(module, ckpt_path=nan_checkpoint)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # nothing was loaded


def test_load_checkpoint_refuses_nan_adapter_tensors(nan_checkpoint: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.v_proj\.lora_B\.default"):
        LoRAFinetuning(LORA, module="model").load_checkpoint(TinyModule(), nan_checkpoint)


def test_good_checkpoint_still_resumes(checkpoint: Path, tmp_path: Path) -> None:
    run = trainer(tmp_path, [LoRAFinetuning(LORA, module="model")], max_steps=3)
    run.fit(TinyModule(), ckpt_path=checkpoint)
    assert run.global_step == 3
