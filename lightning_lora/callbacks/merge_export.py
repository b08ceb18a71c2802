"""``MergeAndExport``: at the end of fit, write the adapter and a merged model (rank zero, atomically)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.callbacks._model_ready import target_module
from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.io.export import ExportReport, export_merged
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER
from lightning_lora.surgery.lora.inventory import adapter_configs, find_lora_root
from lightning_lora.surgery.lora.merge import MergeBase
from lightning_lora.surgery.training.sharded_export import check_sharded_export, export_merged_sharded
from lightning_lora.surgery.training.sharding import is_sharded


class MergeAndExport(Callback):
    """Export the trained adapter (PEFT format) and the merged model when ``fit`` ends.

    Layout of ``dirpath``: ``adapter/`` (``adapter_config.json`` + safetensors, loadable by PEFT and vLLM),
    ``merged/`` (for a transformers model a ``save_pretrained`` directory that ``AutoModelForCausalLM.from_pretrained``
    loads, with the module's ``tokenizer`` when it has one; for other modules ``model.safetensors`` with the adapted
    module's own parameter names), and ``export.json`` with the largest merged-vs-unmerged output difference on a
    probe batch. The merge runs on a copy: the trained model in memory keeps its adapters. The directory is written
    atomically and only on global rank zero. A model sharded with FSDP2 is not copied: every rank gathers one tensor
    at a time while rank zero writes a sharded ``save_pretrained`` directory block by block (no probe check then).

    Args:
        dirpath: Output directory (replaced whole if it exists).
        module: Attribute path of the adapted network inside the LightningModule. Default: None (found from where
            the LoRA surgery ran).
        adapter_name: Which adapter to export. Default: ``"default"``.
        merge_base: For a 4-bit (QLoRA) base: ``"dequantized"`` (a dense model reproducing the trained one) or
            ``"requantize"`` (stays 4-bit), passed to ``merge_lora``. ``"original"`` needs the unquantized weights,
            which the callback does not have: call ``merge_lora(model, merge_base="original", original=...)`` after
            training instead. Default: None (``merge_lora``'s default).

    Raises:
        ValueError: If ``merge_base`` is ``"original"`` or not a merge base (at construction, before any training).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[MergeAndExport("out/export")])
    """

    def __init__(self, dirpath: str | Path, *, module: str | None = None, adapter_name: str = DEFAULT_ADAPTER,
                 merge_base: MergeBase | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.module = module
        self.adapter_name = adapter_name
        if merge_base is not None and merge_base not in ("dequantized", "requantize"):
            raise ValueError(f"MergeAndExport(merge_base={merge_base!r}): use 'dequantized' or 'requantize'. 'original' "
                             "needs the unquantized weights, which this callback does not have.\nHINT: after training, "
                             "call merge_lora(model, merge_base='original', original=<the unquantized model>).")
        self.merge_base = merge_base
        self.report: ExportReport | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before training, not after it, when there is nothing to export.
        _, root = find_lora_root(target_module(pl_module, self.module))
        if self.adapter_name not in adapter_configs(root):
            known = sorted(adapter_configs(root)) or "none"
            raise SurgeryError(f"MergeAndExport: the model has no LoRA adapter {self.adapter_name!r} (adapters: {known}).\n"
                               "HINT: add LoRAFinetuning(...) to the Trainer's callbacks, or pass the adapter_name it uses.")
        if is_sharded(root):
            check_sharded_export(root, self.adapter_name)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = target_module(pl_module, self.module)
        _, root = find_lora_root(target)
        if is_sharded(root):  # FSDP2: every rank gathers (collective), rank zero writes
            self.report = export_merged_sharded(root, self.dirpath, adapter_name=self.adapter_name,
                                                write=trainer.is_global_zero, tokenizer=getattr(pl_module, "tokenizer", None))
            rank_zero_info(str(self.report))
            return
        if not trainer.is_global_zero:
            return
        config = adapter_configs(root)[self.adapter_name]
        if hasattr(config, "merge_refusal"):  # bottleneck / prompt / P- / prefix tuning: nothing can be merged
            from lightning_lora.surgery.io.adapter_files import save_adapter

            save_adapter(root, self.dirpath / "adapter", name=self.adapter_name)
            rank_zero_info(f"MergeAndExport: wrote the {config.method} adapter {self.adapter_name!r} to "
                           f"{self.dirpath / 'adapter'}; no merged model is written because {config.merge_refusal}.")
            return
        probe = getattr(pl_module, "example_input_array", None) if root is pl_module else None
        self.report = export_merged(root, self.dirpath, adapter_name=self.adapter_name, probe=probe,
                                    tokenizer=getattr(pl_module, "tokenizer", None), merge_base=self.merge_base)
        rank_zero_info(str(self.report))
