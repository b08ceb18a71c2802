"""Run by test_fsdp.py in a subprocess: 2-process CPU FSDP2 (ModelParallelStrategy, gloo) with LoRAFinetuning.

One launch, several fits (each writes under ``<out>``):

1. ``fit``: LoRA on a tiny Llama for 4 steps with MergeAndExport, TrainableParameters and a checkpoint every
   2 steps. Writes the adapters (gathered), each rank's share of the base, whether the base is bitwise unchanged,
   and the sharded model's logits on a probe batch.
2. ``resume``: resumes the 2-step checkpoint of fit 1 on 2 processes and writes the adapters after step 4.
3. ``resume_one``: resumes the 2-step checkpoint written by a one-process run (``<out>/one/...``) when it exists.
4. ``mixed``: LoRA + GradientCheckpointing + LayerFreezing (last block trained fully) for 2 steps.
5. ``options``: ``ShardConfig(reshard_after_forward=False, param_dtype="bfloat16", reduce_dtype="float32")``.
6. ``qlora``: QLoRA (NF4, ``quant_storage`` float32) sharded with FSDP2, 2 steps; writes the adapters.
7. ``meta``: ``CausalLMModule(meta_init=True)`` on ``<out>/meta_model``; peak RSS up to fit start, base vs files.
8. ``refusals``: tensor parallelism and a model sharded before the surgery; writes the error messages.

Lightning re-runs this script for rank 1, so it must be importable as a plain script (no pytest in the process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from lightning_lora import LoRAConfig, QuantConfig
from lightning_lora.callbacks import (
    GradientCheckpointing,
    LayerFreezing,
    LoRAFinetuning,
    MergeAndExport,
    TrainableParameters,
)
from lightning_lora.surgery.training.sharding import ShardConfig, full_tensor, local_tensor
from tests.callbacks.models import ResumableLoader, token_data

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
# QLoRA + FSDP2: the packed 4-bit weights stored as float32 (the compute dtype) shard like the other parameters.
QUANT = QuantConfig(quant_type="nf4", compute_dtype="float32", quant_storage="float32", targets="all-linear",
                    exclude=["lm_head"])
SAMPLES = 32  # 4 steps per epoch at a global batch of 8


class FSDPLlama(L.LightningModule):
    """A tiny transformers Llama; the global batch is ``batch_size`` x number of processes."""

    def __init__(self, batch_size: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        from tests.factories import tiny_llama

        self.model = tiny_llama(num_layers=2, seed=0).train()
        self.batch_size, self.lr = batch_size, lr

    def configure_model(self) -> None:
        torch.manual_seed(1234)  # the LoRA init right after this is the same in every run and process

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> ResumableLoader:
        # Rank r takes samples r, r + 2, ... (Trainer(use_distributed_sampler=False)), so each global batch holds the
        # same 8 samples as the one-process batch; ResumableLoader resumes mid-epoch exactly.
        ids = token_data(n=SAMPLES, vocab=128).tensors[0]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return ResumableLoader(TensorDataset(ids[rank::world]), self.batch_size)


def make_trainer(out: Path, callbacks: list, max_steps: int = 4, devices: int = 2) -> L.Trainer:
    strategy: Any = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if devices == 2 else "auto")
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                     use_distributed_sampler=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                     num_sanity_val_steps=0, callbacks=callbacks)


def checkpointer(dirpath: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1)  # mid-epoch: step 2 of 4


def gathered_adapters(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Whole LoRA factors (collective on a sharded model: every rank calls this)."""
    return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters() if ".lora_" in n}


def base_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters() if not p.requires_grad}


def fit(out: Path, rank_file: dict[str, Any]) -> None:
    module = FSDPLlama()
    before = {n.replace(".base_layer.", "."): p.detach().clone() for n, p in module.named_parameters()}
    params = TrainableParameters(log=False)
    trainer = make_trainer(out, [LoRAFinetuning(LORA, module="model"), MergeAndExport(out / "export", module="model"),
                                 params, checkpointer(out / "ckpt")])
    trainer.fit(module)
    base = {n.replace(".base_layer.", "."): t for n, t in base_state(module).items()}
    adapters = gathered_adapters(module)
    local = sum(local_tensor(p).numel() for p in module.parameters() if not p.requires_grad)
    logical = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    module.eval()
    probe = torch.arange(24).reshape(2, 12) % 128
    with torch.no_grad():
        logits = module.model(input_ids=probe).logits  # every rank runs the sharded forward
    rank_file.update(strategy=type(trainer.strategy).__name__, local_base=local, logical_base=logical,
                     base_unchanged=all(torch.equal(before[n], t) for n, t in base.items()) and set(before) >= set(base),
                     rank_bytes=params.rank_bytes, logical_weight_bytes=params.summary.weight_bytes,
                     grads_on_base=any(p.grad is not None for p in module.parameters() if not p.requires_grad))
    if trainer.is_global_zero:
        save_file(adapters, str(out / "fit_adapters.safetensors"))
        save_file({"logits": logits.contiguous()}, str(out / "fit_logits.safetensors"))


def resume(out: Path, ckpt: Path, name: str) -> None:
    module = FSDPLlama()
    trainer = make_trainer(out / name, [LoRAFinetuning(LORA, module="model")])
    trainer.fit(module, ckpt_path=ckpt)
    adapters = gathered_adapters(module)
    if trainer.is_global_zero:
        save_file(adapters, str(out / f"{name}_adapters.safetensors"))


def qlora(out: Path) -> None:
    module = FSDPLlama()
    trainer = make_trainer(out / "qlora", [LoRAFinetuning(LORA, quantize=QUANT, module="model")], max_steps=2)
    trainer.fit(module)
    adapters = gathered_adapters(module)
    if trainer.is_global_zero:
        save_file(adapters, str(out / "qlora_adapters.safetensors"))


def _rss_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


class PeakAtFitStart(L.Callback):
    """Reads this process's peak RSS at fit start: after the model is built, adapted, sharded and loaded."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_kib = _rss_kib("VmHWM")


def meta(out: Path, rank_file: dict[str, Any]) -> None:
    """CausalLMModule(meta_init=True): built on meta, LoRA, sharded, each rank reads its rows of the files."""
    from safetensors.torch import load_file as load

    from lightning_lora.modules.causal_lm import CausalLMModule

    directory = out / "meta_model"
    module = CausalLMModule(model=str(directory), exact_match=False, meta_init=True)
    ids = torch.arange(2 * 12).reshape(2, 12) % 200
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    peak, lora = PeakAtFitStart(), LoRAFinetuning(LORA, module="model")
    trainer = make_trainer(out / "meta", [lora, peak], max_steps=1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    files = load(str(directory / "model.safetensors"))
    base = {n.replace(".base_layer.", "."): full_tensor(p.detach()) for n, p in module.model.named_parameters()
            if not p.requires_grad}
    rank_file.update(meta_peak_increase=(peak.peak_kib - before) * 1024,
                     meta_full_bytes=sum(t.numel() * t.element_size() for t in files.values()),
                     meta_base_equal=set(base) == set(files) and all(torch.equal(files[n], t) for n, t in base.items()),
                     meta_identity=lora.identity)


def options(out: Path) -> None:
    """reshard_after_forward=False with bf16 compute and fp32 gradient reduction (FSDP2's MixedPrecisionPolicy)."""
    module = FSDPLlama()
    shard = ShardConfig(reshard_after_forward=False, param_dtype="bfloat16", reduce_dtype="float32")
    trainer = make_trainer(out / "options", [LoRAFinetuning(LORA, module="model", shard=shard)], max_steps=2)
    trainer.fit(module)
    adapters = gathered_adapters(module)
    if trainer.is_global_zero:
        save_file(adapters, str(out / "options_adapters.safetensors"))


def mixed(out: Path, rank_file: dict[str, Any]) -> None:
    module = FSDPLlama()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "layers.1." in n}
    callbacks = [GradientCheckpointing(module="model"), LayerFreezing(blocks=[1], module="model"),
                 LoRAFinetuning(LORA, module="model")]
    trainer = make_trainer(out / "mixed", callbacks, max_steps=2)
    trainer.fit(module)
    after = {n.replace(".base_layer.", "."): full_tensor(p.detach()) for n, p in module.named_parameters()
             if ".lora_" not in n}
    rank_file.update(mixed_checkpointing=bool(module.model.is_gradient_checkpointing),
                     mixed_block1_changed=sum(not torch.equal(t, after[n]) for n, t in before.items()),
                     mixed_block1_tensors=len(before),
                     mixed_block0_changed=sum(not torch.equal(p.detach(), after[n]) for n, p in FSDPLlama().named_parameters()
                                              if "layers.1." not in n))


class PreSharded(FSDPLlama):
    """Shards in its own configure_model, before LoRAFinetuning's surgery: refused."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])


def refusals(out: Path, rank_file: dict[str, Any]) -> None:
    """Each case raises on every rank before any collective, so the launch goes on."""
    cases = {"tensor_parallel": (FSDPLlama(), ModelParallelStrategy()),  # bare: tensor parallel over both devices
             "pre_sharded": (PreSharded(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))}
    for name, (module, strategy) in cases.items():
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=out / name, callbacks=[LoRAFinetuning(LORA, module="model")])
        try:
            trainer.fit(module)
            rank_file[name] = "no error"
        except Exception as error:  # noqa: BLE001 - the message is what the test checks
            rank_file[name] = f"{type(error).__name__}: {error}"
        torch.distributed.barrier()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    rank_file: dict[str, Any] = {}
    fit(out, rank_file)
    resume(out, out / "ckpt" / "epoch=0-step=2.ckpt", "resume")
    one = out / "one" / "epoch=0-step=2.ckpt"
    if one.exists():
        resume(out, one, "resume_one")
    mixed(out, rank_file)
    qlora(out)
    options(out)
    if (out / "meta_model").exists():
        meta(out, rank_file)
    refusals(out, rank_file)
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(rank_file))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
