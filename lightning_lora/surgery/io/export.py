"""Export a trained adapter and a merged model, without touching the model in memory.

The merge runs on a deep copy, so training can go on (or the unmerged model be evaluated) afterwards. Everything is
written into one directory atomically (readers see the old export or the new one, never half of one)::

    <dirpath>/adapter/        adapter_config.json + adapter_model.safetensors (PEFT format)
    <dirpath>/merged/         transformers: save_pretrained directory (+ tokenizer when given)
                              other modules: model.safetensors with the module's own parameter names
    <dirpath>/export.json     what was written and the max abs logit difference merged vs unmerged

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, apply_lora
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = apply_lora(model, LoRAConfig(r=2, targets=["0"]))
    >>> report = export_merged(model, "/tmp/doctest-export", probe=torch.ones(1, 8))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.io.adapter_files import save_adapter
from lightning_lora.surgery.io.atomic import atomic_dir
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER
from lightning_lora.surgery.lora.inventory import adapter_configs, find_lora_root
from lightning_lora.surgery.lora.merge import MergeBase, merge_lora

log = logging.getLogger(__name__)

MERGED_WEIGHTS = "model.safetensors"
REPORT_NAME = "export.json"


@dataclass
class ExportReport:
    """What :func:`export_merged` wrote.

    Attributes:
        dirpath: The export directory. adapter_dir / merged_dir: Its two parts (``adapter_dir`` None if skipped).
        format: ``"transformers"`` (a ``save_pretrained`` directory) or ``"safetensors"`` (one state-dict file).
        adapter: The adapter merged. max_abs_diff: Largest ``|merged - unmerged|`` output difference on the probe
            batch, or None when there was no probe.
    """

    dirpath: str
    adapter_dir: str | None
    merged_dir: str
    format: str
    adapter: str
    max_abs_diff: float | None

    def __str__(self) -> str:
        diff = "not measured (no probe input)" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        return (f"Exported adapter {self.adapter!r} to {self.dirpath}: merged {self.format} model in {self.merged_dir}"
                + (f", adapter in {self.adapter_dir}" if self.adapter_dir else "") + f"; max |merged - unmerged| = {diff}")


def export_merged(model: nn.Module, dirpath: str | Path, *, adapter_name: str = DEFAULT_ADAPTER, adapter: bool = True,
                  probe: Any = None, tokenizer: Any = None, merge_base: MergeBase | None = None) -> ExportReport:
    """Write adapter ``adapter_name`` (PEFT format) and the model with it merged, atomically; ``model`` is unchanged.

    Args:
        model: The adapted model, or a module holding it (the export is of the module ``apply_lora`` ran on).
        dirpath: Output directory; replaced whole if it exists.
        adapter_name: Which adapter to merge and save. Default: ``"default"``.
        adapter: Also write the adapter in PEFT format. Default: True.
        probe: Input for the merged-vs-unmerged check: a tensor, or a tuple of positional inputs. Default: for a
            transformers model with a vocabulary, 2 x 16 seeded random token ids; otherwise no check.
        tokenizer: Saved beside a transformers model when given (anything with ``save_pretrained``).
        merge_base: For a 4-bit (QLoRA) base, passed to :func:`merge_lora`: ``"dequantized"`` (a dense model that
            reproduces the trained one) or ``"requantize"`` (stays 4-bit). Default: None (``merge_lora``'s default).

    Returns:
        An :class:`ExportReport` (also written to ``export.json``).

    Raises:
        SurgeryError: If the model has no adapter called ``adapter_name``.
        MergeError: If merging would give non-finite weights (nothing is written then).
    """
    _, root = find_lora_root(model)
    if adapter_name not in adapter_configs(root):
        known = sorted(adapter_configs(root)) or "none"
        raise SurgeryError(f"export_merged: no LoRA adapter named {adapter_name!r} on this model (adapters: {known}). "
                           "HINT: apply LoRA first (LoRAFinetuning / apply_lora), or pass the right adapter_name=.")
    merged = copy.deepcopy(root)
    merge_lora(merged, adapters=[adapter_name], unload=True, **_merge_kwargs(merge_base))
    diff = _max_abs_diff(root, merged, _default_probe(root) if probe is None else probe)
    is_hf = hasattr(merged, "save_pretrained") and hasattr(merged, "config")
    target = Path(dirpath)
    report = ExportReport(str(target), str(target / "adapter") if adapter else None, str(target / "merged"),
                          "transformers" if is_hf else "safetensors", adapter_name, diff)
    with atomic_dir(target) as tmp:
        if adapter:
            save_adapter(root, tmp / "adapter", name=adapter_name)
        _write_merged(merged, tmp / "merged", is_hf, tokenizer)
        (tmp / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    log.info("%s", report)
    return report


def _merge_kwargs(merge_base: MergeBase | None) -> dict[str, Any]:
    return {} if merge_base is None else {"merge_base": merge_base}


def _write_merged(merged: nn.Module, out: Path, is_hf: bool, tokenizer: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if is_hf:
        merged.save_pretrained(str(out))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out))
        return
    # Clone: safetensors refuses tensors that share storage (tied weights), and we want the file self-contained.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in merged.state_dict().items()}
    save_file(tensors, str(out / MERGED_WEIGHTS), metadata={"format": "pt"})


def _default_probe(model: nn.Module) -> Any:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return None
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, 16), generator=generator)}


@torch.no_grad()
def _max_abs_diff(unmerged: nn.Module, merged: nn.Module, probe: Any) -> float | None:
    if probe is None:
        return None
    was_training = unmerged.training
    unmerged.eval()
    merged.eval()
    try:
        before, after = _output(unmerged, probe), _output(merged, probe)
    finally:
        unmerged.train(was_training)
    return float((before.float() - after.float()).abs().max())


def _output(model: nn.Module, probe: Any) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(probe, dict):
        out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in probe.items()})
    elif isinstance(probe, (tuple, list)):
        out = model(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in probe])
    else:
        out = model(probe.to(device))
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return next(o for o in out if isinstance(o, torch.Tensor))
    return out
