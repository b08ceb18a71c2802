"""Run by test_ddp.py in a subprocess: 2-process CPU DDP with LoRAFinetuning + GradientCheckpointing.

Each rank saves its adapter tensors to ``<out>/rank<N>.safetensors`` after fit. Lightning's DDP launcher re-runs
this script for rank 1, so it must be importable as a plain script (no pytest in the process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import GradientCheckpointing, LoRAFinetuning
from tests.callbacks.models import TinyLlamaModule, adapter_tensors


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=0.05)
    callbacks = [GradientCheckpointing(module="model"), LoRAFinetuning(LoRAConfig(r=4), module="model")]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out, callbacks=callbacks)
    trainer.fit(module)
    assert module.model.is_gradient_checkpointing
    save_file(adapter_tensors(module), str(out / f"rank{trainer.global_rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
