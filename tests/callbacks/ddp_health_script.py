"""Run by test_adapter_health_ddp.py: 2-process CPU DDP where only rank 1 sees a non-finite loss.

``argv[2] == "skip"``: the loss on rank 1 is +inf at step 1 (a constant, so gradients stay finite and rank 0 sees
nothing wrong by itself); both ranks must skip that step together and end with identical adapters, saved to
``<out>/rank<N>.safetensors``. ``"stop"``: the same on rank 1 must stop *both* ranks at step 1; each rank writes
``<out>/stopped<N>.txt`` with the error before re-raising.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import save_file

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import AdapterHealth, LoRAFinetuning
from lightning_lora.surgery.errors import NonFiniteError
from tests.callbacks.models import TinyModule, adapter_tensors


class RankOneInf(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_rank == 1 and self.trainer.global_step == 1:
            loss = loss + math.inf
        return loss


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = RankOneInf()
    health = AdapterHealth(on_nonfinite=mode)  # type: ignore[arg-type]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out, callbacks=[LoRAFinetuning(LoRAConfig(r=4), module="model"), health])
    try:
        trainer.fit(module)
    except NonFiniteError as err:
        (out / f"stopped{trainer.global_rank}.txt").write_text(str(err))
        raise
    (out / f"skipped{trainer.global_rank}.txt").write_text(repr(health.skipped_steps))
    save_file(adapter_tensors(module), str(out / f"rank{trainer.global_rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
