"""``diagnose_adapter``: what a user needs to know about an adapter directory before serving it.

Reads the adapter, checks it against the base model (keys and shapes: a wrong base shows there), loads it under a
temporary name, measures each layer (untrained B = 0, non-finite values, relative update size), runs a few probe
prompts with and without it (KL(base || adapted) per token, greedy outputs), and checks vLLM's rules. The model
is left as it was: the adapter is deleted again at the end.

Problems (the adapter does not do what was trained, or does not fit): non-finite tensors, all-zero B layers, keys
or shapes that do not fit the model. Warnings (worth knowing, not wrong): tied weights under an adapted layer,
vLLM incompatibilities, no measurable effect on the probes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_lora.surgery.diagnostics.health import adapter_units, describe, relative_update_sizes
from lightning_lora.surgery.diagnostics.vllm_compat import VLLM_VERSION, vllm_findings
from lightning_lora.surgery.errors import AdapterLoadError
from lightning_lora.surgery.io.adapter_files import load_adapter, read_adapter
from lightning_lora.surgery.lora.active import delete_adapter, disable_adapters, use_adapters

DOCTOR_ADAPTER = "doctor"
DEFAULT_PROBES = (
    "The capital of France is",
    "Write one sentence about the ocean.",
    "2 + 2 =",
)


@dataclass(frozen=True)
class LayerRow:
    """One adapted layer: config rank vs tensor shapes, and what its tensors hold."""

    path: str
    config_r: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    b_zero: bool
    update: float


@dataclass(frozen=True)
class ProbeRow:
    """One probe prompt: mean KL(base || adapted) per token and the greedy continuations."""

    prompt: str
    kl: float
    base: str
    adapted: str


@dataclass
class DoctorReport:
    """The doctor's findings; ``healthy`` is False when there is at least one problem."""

    adapter_dir: str
    layers: list[LayerRow] = field(default_factory=list)
    probes: list[ProbeRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No problems (warnings allowed)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form."""
        return {"adapter_dir": self.adapter_dir, "healthy": self.healthy, "problems": self.problems,
                "warnings": self.warnings, "layers": [vars(r) for r in self.layers],
                "probes": [vars(p) for p in self.probes]}

    def __str__(self) -> str:
        lines = [f"Adapter {self.adapter_dir}: " + ("healthy" if self.healthy else "PROBLEMS")]
        if self.layers:
            width = max(len(r.path) for r in self.layers)
            header = ("layer", "r", "A", "B", "B=0", "||sBA||/||W||")
            lines.append(f"  {header[0]:<{width}}  {header[1]:>4}  {header[2]:>12}  {header[3]:>12}  {header[4]:>4}  "
                         f"{header[5]:>13}")
            for r in self.layers:
                lines.append(f"  {r.path:<{width}}  {r.config_r:>4}  {str(r.a_shape):>12}  {str(r.b_shape):>12}  "
                             f"{'yes' if r.b_zero else 'no':>4}  {r.update:>13.3g}")
        for p in self.probes:
            lines.append(f"  probe {p.prompt!r}: KL(base||adapted) {p.kl:.4g}/token; base -> {p.base!r}; "
                         f"adapted -> {p.adapted!r}")
        lines += [f"  PROBLEM: {p}" for p in self.problems] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def diagnose_adapter(model: nn.Module, adapter_dir: str | Path, *, tokenizer: Any = None,
                     prompts: tuple[str, ...] | list[str] = DEFAULT_PROBES, max_new_tokens: int = 12) -> DoctorReport:
    """Check an adapter directory against a base model; see the module docstring for what is checked.

    Args:
        model: The base model the adapter was trained on (plain, or with other adapters: they are left alone).
        adapter_dir: A PEFT-format adapter directory.
        tokenizer: Used for the probe prompts; without one the probes are skipped. Default: None.
        prompts: Probe prompts. Default: three short general prompts.
        max_new_tokens: Greedy tokens generated per probe, with and without the adapter. Default: 12.

    Returns:
        A :class:`DoctorReport`; ``report.healthy`` is False when there are problems.

    Raises:
        FileNotFoundError: If ``adapter_dir`` or its files do not exist.

    Example:
        >>> report = diagnose_adapter(model, "out/demo/adapter", tokenizer=tokenizer)  # doctest: +SKIP
        >>> print(report); report.healthy
    """
    report = DoctorReport(str(adapter_dir))
    try:
        config, tensors = read_adapter(adapter_dir)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, RuntimeError, SafetensorError) as err:  # unreadable config or weights: reported
        report.problems.append(f"cannot read the adapter: {type(err).__name__}: {err}")
        return report
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        report.problems.append(f"{len(bad)} tensor(s) hold inf or NaN: {describe(bad)}")
    mismatched = _config_rank_mismatches(config, tensors)
    if mismatched:
        report.problems.append(f"adapter_config.json does not match its own tensors: {describe(mismatched)}")
        return report
    with _finite_copy(adapter_dir, tensors, bad) as loadable:
        try:
            load_adapter(model, loadable, name=DOCTOR_ADAPTER)
        except AdapterLoadError as err:
            report.problems.append("the adapter does not fit this model (trained on another base model?): "
                                   + str(err).replace(str(loadable), str(adapter_dir)))
            return report
    try:
        _measure(model, config, report)
        if tokenizer is not None and prompts:
            report.probes = [_probe(model, tokenizer, p, max_new_tokens) for p in prompts]
            if report.probes and all(p.kl == 0 and p.base == p.adapted for p in report.probes) and report.healthy:
                report.warnings.append("the adapter changes nothing measurable on the probe prompts")
    finally:
        delete_adapter(model, DOCTOR_ADAPTER)
    return report


def _config_rank_mismatches(config: Any, tensors: dict[str, Tensor]) -> list[str]:
    found = []
    for key, tensor in sorted(tensors.items()):
        if key.endswith(".lora_A.weight") and tensor.dim() == 2:
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            if tensor.shape[0] != config.rank_for(path):
                found.append(f"{path}: config r={config.rank_for(path)}, tensor rank {tensor.shape[0]}")
    return found


class _finite_copy:  # a context manager used like a function
    """The adapter directory, or a temporary copy with non-finite values zeroed so that its fit can be checked."""

    def __init__(self, adapter_dir: str | Path, tensors: dict[str, Tensor], bad: list[str]) -> None:
        self.adapter_dir, self.tensors, self.bad = Path(adapter_dir), tensors, bad
        self.tmp: str | None = None

    def __enter__(self) -> Path:
        if not self.bad:
            return self.adapter_dir
        self.tmp = tempfile.mkdtemp(prefix="lightning-lora-doctor-")
        shutil.copy(self.adapter_dir / "adapter_config.json", Path(self.tmp) / "adapter_config.json")
        clean = {k: torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) if k in self.bad else t
                 for k, t in self.tensors.items()}
        save_file({k: v.contiguous() for k, v in clean.items()}, str(Path(self.tmp) / "adapter_model.safetensors"))
        return Path(self.tmp)

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _measure(model: nn.Module, config: Any, report: DoctorReport) -> None:
    units = adapter_units(model, adapter=DOCTOR_ADAPTER)
    sizes = relative_update_sizes(units)
    kinds, ranks = {}, {}
    for unit in units:
        a, b = unit.tensors["lora_A"], unit.tensors["lora_B"]  # (r, in), (out, r)
        zero = not bool(b.detach().any())
        report.layers.append(LayerRow(unit.path, config.rank_for(unit.path),
                                      tuple(a.shape), tuple(b.shape), zero, sizes.get(unit.label, 0.0)))
        base = model.get_submodule(unit.path).base_layer
        kinds[unit.path], ranks[unit.path] = type(base).__name__, a.shape[0]
    zero = [r.path for r in report.layers if r.b_zero]
    if zero and len(zero) == len(report.layers):
        report.problems.append("untrained: every layer's B is all zero, so the adapter's output is exactly the base "
                               "model's (saved before training, or the optimizer never held the adapters)")
    elif zero:
        report.problems.append(f"{len(zero)} layer(s) untrained (B all zero): {describe(zero)}")
    report.warnings += _tied_weight_warnings(model, [u.path for u in units])
    report.warnings += vllm_findings(config, ranks, kinds)


def _tied_weight_warnings(model: nn.Module, paths: list[str]) -> list[str]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and not name.endswith(".base_layer"):
            owners.setdefault(id(weight), []).append(name)
    warnings = []
    for path in paths:
        weight = getattr(model.get_submodule(path).base_layer, "weight", None)
        shared = [n for n in owners.get(id(weight), []) if n != path and n != f"{path}.base_layer"]
        if shared:
            warnings.append(f"{path}'s weight is tied to {shared[0]}: merging this adapter also changes {shared[0]} "
                            "(untie before merging, or serve unmerged)")
    return warnings


@torch.no_grad()
def _probe(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> ProbeRow:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=_device(model))  # (1, T)
    with use_adapters(model, DOCTOR_ADAPTER):
        adapted = F.log_softmax(_logits(model, ids).float(), dim=-1)  # (1, T, V)
        adapted_text = _greedy(model, tokenizer, ids, max_new_tokens)
    with disable_adapters(model):
        base = F.log_softmax(_logits(model, ids).float(), dim=-1)  # (1, T, V)
        base_text = _greedy(model, tokenizer, ids, max_new_tokens)
    kl = (base.exp() * (base - adapted)).sum(-1).mean().item()  # KL(base || adapted), mean over positions
    return ProbeRow(prompt, max(kl, 0.0), base_text, adapted_text)


def _greedy(model: nn.Module, tokenizer: Any, ids: Tensor, max_new_tokens: int) -> str:
    out = ids
    for _ in range(max_new_tokens):  # no KV cache: a handful of tokens on short prompts
        token = _logits(model, out)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out = torch.cat([out, token], dim=1)
        if tokenizer.eos_token_id is not None and token.item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    output = model(input_ids=ids)
    return output.logits if hasattr(output, "logits") else output


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def report_json(report: DoctorReport) -> str:
    """``report`` as indented JSON."""
    return json.dumps(report.to_dict(), indent=2)


__all__ = ["DEFAULT_PROBES", "VLLM_VERSION", "DoctorReport", "LayerRow", "ProbeRow", "diagnose_adapter", "report_json"]
