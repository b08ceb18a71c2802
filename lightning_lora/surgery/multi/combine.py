"""Combine adapters into a new named adapter: a weighted linear mix, a concatenation, or an SVD to a chosen rank.

Each input adapter ``i`` has the update ``ΔW_i = s_i B_i A_i`` in each layer, with ``s_i = alpha_i / r_i`` (or
``alpha_i / sqrt(r_i)`` with rsLoRA). The scales are folded into the new factors, and the new adapter has scale 1
(``alpha = r`` in every layer), so what it adds is exactly what the formulas below say:

* ``"cat"``: ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, rank ``sum r_i``:
  ``ΔW = sum_i w_i ΔW_i`` exactly. Targets may differ (a layer sums the adapters that have it).
* ``"svd"``: the best rank-``rank`` approximation (Eckart-Young) of ``sum_i w_i ΔW_i``, split as
  ``B = U sqrt(S)``, ``A = sqrt(S) V^T``; exact when ``rank >= sum r_i``. Computed from the thin factors (two
  QR decompositions and an SVD of a ``sum r_i`` square matrix, in float64), never from the dense ``(out, in)`` sum.
* ``"linear"``: the factors themselves are mixed, as PEFT's ``combination_type="linear"``:
  ``A = sum_i sqrt(|w_i| s_i) A_i``, ``B = sum_i sign(w_i) sqrt(|w_i| s_i) B_i``, same rank. Then
  ``ΔW = sum_i w_i ΔW_i + sum_{i != j} (cross terms B_i A_j)``: exact for one adapter (scaling it), otherwise a
  heuristic for adapters that share a starting point. Needs the same rank and the same layers in every input.

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, apply_lora, combine_adapters
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = apply_lora(model, LoRAConfig(r=2, targets=["0"]), name="legal")
    >>> _ = apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["0", "2"]), name="medical")
    >>> report = combine_adapters(model, ["legal", "medical"], [0.7, 0.3], name="both", method="cat")
    >>> report.adapter
    'both'
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import CombineError, SurgeryError
from lightning_lora.surgery.lora.active import check_adapter_names, list_adapters, require_lora_adapters
from lightning_lora.surgery.lora.apply import add_adapter
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.inventory import adapter_configs, find_lora_root, lora_layers
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.report import SurgeryReport, count_parameters

log = logging.getLogger(__name__)

Method = Literal["linear", "cat", "svd"]
_METHODS = ("linear", "cat", "svd")
_Factors = tuple[Tensor, Tensor]  # A (r, in), B (out, r), scale 1




def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None = None, *, name: str,
                     method: Method = "cat", rank: int | None = None) -> SurgeryReport:
    """Add adapter ``name`` built from ``adapters`` (see the module docstring for the math), in place.

    The new adapter is not active and not trainable; the active adapters and every ``requires_grad`` stay as they
    were (``set_active_adapters(model, name)`` to use it, ``set_trainable(model, name)`` to train it). It saves in
    PEFT's format like any other (``save_adapter(model, dir, name=name)``).

    Args:
        model: A model with the input adapters (or a module holding it).
        adapters: Names of the adapters to combine.
        weights: One weight per adapter (negative subtracts). Default: 1 for each.
        name: Name of the new adapter.
        method: ``"cat"`` (exact weighted sum, rank = sum of ranks), ``"svd"`` (best approximation at ``rank``)
            or ``"linear"`` (mix the factors; same rank and layers needed). Default: ``"cat"``.
        rank: The new rank for ``"svd"``. Default: the largest input rank.

    Returns:
        The :class:`SurgeryReport` of the new adapter.

    Raises:
        UnknownAdapterError: If an input adapter does not exist (the message lists the known ones).
        CombineError: If the inputs cannot be combined by ``method`` (the message says why and what would work).
        SurgeryError: If ``name`` exists already, or adapters are merged.
    """
    _, root = find_lora_root(model)
    inputs, coefs = _check_inputs(root, adapters, weights, name, method, rank)
    layers = [(p, layer) for p, layer in lora_layers(root) if any(a in layer.specs for a in inputs)]
    if method == "linear":
        _check_linear(layers, inputs)
    rank = rank if rank is not None else max(layer.specs[a].r for _, layer in layers for a in inputs if a in layer.specs)
    if method == "svd":
        _check_svd_rank(layers, rank)
    factors = {path: _combine_layer(layer, inputs, coefs, method, rank) for path, layer in layers}
    config = _new_config(root, inputs, {p: a.shape[0] for p, (a, _) in factors.items()})
    return _add(root, name, config, factors)


# --------------------------------------------------------------------------------------------------- validation
def _check_inputs(root: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None, name: str, method: str,
                  rank: int | None) -> tuple[list[str], list[float]]:
    inputs = [adapters] if isinstance(adapters, str) else list(adapters)
    if not inputs:
        raise CombineError("combine_adapters: adapters=[]; give at least one adapter name.")
    check_adapter_names(root, inputs, "combine_adapters")
    require_lora_adapters(root, inputs, "combine_adapters", CombineError)
    if name in list_adapters(root):
        raise SurgeryError(f"combine_adapters: an adapter named {name!r} exists already; choose another name= or "
                           f"delete_adapter(model, {name!r}) first.")
    coefs = [1.0] * len(inputs) if weights is None else list(weights)
    if len(coefs) != len(inputs) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in coefs):
        raise CombineError(f"combine_adapters: weights={weights!r}; give one finite number per adapter "
                           f"({len(inputs)} for {inputs}).")
    if method not in _METHODS:
        raise CombineError(f"combine_adapters: method={method!r}; choose one of {list(_METHODS)}.")
    if rank is not None and method != "svd":
        raise CombineError(f"combine_adapters: rank={rank!r} applies only to method='svd' ({method!r} fixes the rank).")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise CombineError(f"combine_adapters: rank={rank!r}; must be a positive integer.")
    merged = sorted({n for _, layer in lora_layers(root) for n in layer.merged_adapters})
    if merged:
        raise SurgeryError(f"combine_adapters: adapters {merged} are merged; call unmerge_lora(model) first.")
    return inputs, [float(w) for w in coefs]


def _check_linear(layers: list[tuple[str, LoRALayer]], inputs: list[str]) -> None:
    problems = []
    for path, layer in layers:
        missing = [a for a in inputs if a not in layer.specs]
        ranks = {a: layer.specs[a].r for a in inputs if a in layer.specs}
        if missing:
            problems.append(f"{path}: adapted by {sorted(ranks)} but not by {missing}")
        elif len(set(ranks.values())) > 1:
            problems.append(f"{path}: ranks differ ({', '.join(f'{a}: r={r}' for a, r in ranks.items())})")
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CombineError(f"combine_adapters(method='linear') mixes the factors A and B themselves, so every adapter "
                           f"needs the same rank in the same layers; {len(problems)} layer(s) differ:\n  {shown}\n"
                           f"Use method='cat' (exact, rank = sum of ranks) or method='svd' (rank of your choice).")


def _check_svd_rank(layers: list[tuple[str, LoRALayer]], rank: int) -> None:
    too_small = [f"{p} ({layer.in_features}x{layer.out_features})" for p, layer in layers
                 if rank > min(layer.in_features, layer.out_features)]
    if too_small:
        raise CombineError(f"combine_adapters: rank={rank} exceeds min(in, out) of {len(too_small)} layer(s), e.g. "
                           f"{too_small[0]}; choose rank <= {min(min(lin.in_features, lin.out_features) for _, lin in layers)}.")


# --------------------------------------------------------------------------------------------------- the math
def _combine_layer(layer: LoRALayer, inputs: list[str], coefs: list[float], method: str, rank: int) -> _Factors:
    present = [(a, w) for a, w in zip(inputs, coefs) if a in layer.specs]
    factors = [(layer.lora_A[a].detach().double(), layer.lora_B[a].detach().double(), w * layer.specs[a].scale)
               for a, w in present]  # (r, in), (out, r), w_i s_i
    if method == "linear":
        a = sum(math.sqrt(abs(c)) * fa for fa, _, c in factors)  # (r, in)
        b = sum(math.copysign(math.sqrt(abs(c)), c) * fb for _, fb, c in factors)  # (out, r)
        return a, b
    a_cat = torch.cat([fa for fa, _, _ in factors], dim=0)  # (R, in)
    b_cat = torch.cat([c * fb for _, fb, c in factors], dim=1)  # (out, R)
    if method == "cat":
        return a_cat, b_cat
    return _truncated_svd(a_cat, b_cat, rank)


def _truncated_svd(a: Tensor, b: Tensor, rank: int) -> _Factors:
    """Rank-``rank`` factors of ``b @ a`` from thin factors: ``b = Qb Rb``, ``a^T = Qa Ra``, ``Rb Ra^T = U S V^T``."""
    qb, rb = torch.linalg.qr(b)  # (out, k1), (k1, R)
    qa, ra = torch.linalg.qr(a.T)  # (in, k2), (k2, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # (k1, k), (k,), (k, k2)
    u, vh = qb @ u, vh @ qa.T  # (out, k), (k, in): b @ a = u diag(s) vh
    k = min(rank, s.shape[0])
    root_s = s[:k].sqrt()
    new_a = torch.zeros(rank, a.shape[1], dtype=a.dtype)
    new_b = torch.zeros(b.shape[0], rank, dtype=b.dtype)
    new_a[:k] = root_s[:, None] * vh[:k]  # (k, in); rows past the delta's rank stay zero
    new_b[:, :k] = u[:, :k] * root_s  # (out, k)
    return new_a, new_b


# --------------------------------------------------------------------------------------------------- the new adapter
def _new_config(root: nn.Module, inputs: list[str], ranks: dict[str, int]) -> LoRAConfig:
    configs = adapter_configs(root)
    shared = {(configs[a].bias, tuple(configs[a].modules_to_save)) for a in inputs if a in configs}
    if len(shared) > 1:
        raise CombineError(f"combine_adapters: the adapters train different biases / modules_to_save "
                           f"({ {a: (configs[a].bias, configs[a].modules_to_save) for a in inputs if a in configs} }); "
                           f"those are trained in place and cannot be combined. Combine adapters that agree on them.")
    bias, modules_to_save = shared.pop() if shared else ("none", ())
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(path): r for path, r in ranks.items() if r != common}
    dropout = max((configs[a].dropout for a in inputs if a in configs), default=0.0)
    # Scale 1 everywhere (alpha = r): the folded factors are the update itself.
    return LoRAConfig(r=common, alpha=common, dropout=dropout, targets=list(ranks), bias=bias,
                      modules_to_save=list(modules_to_save), rank_pattern=odd,
                      alpha_pattern={k: float(r) for k, r in odd.items()})


def _add(root: nn.Module, name: str, config: LoRAConfig, factors: dict[str, _Factors]) -> SurgeryReport:
    report = add_adapter(root, config, name)  # inactive and frozen: nothing else changes
    layers = dict(lora_layers(root))
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer = layers[path]
            layer.lora_A[name].copy_(a.to(layer.lora_A[name].dtype))
            layer.lora_B[name].copy_(b.to(layer.lora_B[name].dtype))
    trainable, total = count_parameters(root)
    log.info("Combined adapters into %r (%d layers)", name, len(factors))
    return SurgeryReport(name, report.replaced, report.extended, report.skipped, trainable, total, report.adapter_params)
