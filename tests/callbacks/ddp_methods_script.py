"""Run by test_ddp_methods.py in a subprocess: 2-process CPU DDP with PEFTFinetuning(PrefixTuningConfig).

Each rank saves its adapter tensors to ``<out>/rank<N>.safetensors`` after fit (a plain script: Lightning's DDP
launcher re-runs it for rank 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from lightning_lora import PrefixTuningConfig, adapter_parameters
from lightning_lora.callbacks import PEFTFinetuning
from tests.callbacks.models import TinyLlamaModule


class SaveInitial(L.Callback):
    """Save the adapter as training starts (after the surgery, before the first step)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _save(pl_module, self.out / f"init{trainer.global_rank}.safetensors")


def _save(module: L.LightningModule, path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in adapter_parameters(module.model).items()}, str(path))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=0.05)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out, callbacks=[PEFTFinetuning(PrefixTuningConfig(num_virtual_tokens=3,
                                                                                           projection=True),
                                                                        module="model"), SaveInitial(out)])
    trainer.fit(module)
    _save(module, out / f"rank{trainer.global_rank}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
