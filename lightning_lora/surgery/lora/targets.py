"""Target selection: which modules of a model get adapters. Pure: reads the model, never changes it."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from lightning_lora.surgery.errors import LoRAConfigError, TargetMatchError
from lightning_lora.surgery.lora.codecs import codec_for, supported_names
from lightning_lora.surgery.lora.config import LoRAConfig, parse_layer_slice

PRESETS = ("all-linear", "attention", "mlp")

# Block containers whose numbered children are transformer blocks: Llama `layers.N`, GPT-2 `h.N`, BERT `layer.N`...
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")
_ATTENTION_PART = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_PARTS = {"mlp", "feed_forward", "ffn", "intermediate", "mixer_mlp"}
_MLP_NAMES = {
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",  # Llama, Mistral, Qwen
    "fc1", "fc2", "c_fc",  # OPT, Phi, GPT-2
    "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "lin1", "lin2",  # Mixtral-style, Falcon/BLOOM, DistilBERT
}
# Output heads that never get a low-rank adapter under "all-linear" (PEFT excludes the output embedding; we also
# exclude common classifier heads: train those fully via `modules_to_save`).
_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "embed_out")


def block_index(module_name: str) -> int | None:
    """The transformer block a module path sits in (``model.layers.3.mlp`` -> 3), or None outside any block."""
    match = _BLOCK_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    """How many transformer blocks the model has, from the largest block index in its module paths, plus one."""
    indices = [i for i in (block_index(n) for n, _ in model.named_modules()) if i is not None]
    return max(indices) + 1 if indices else 0


def resolve_layers(layers: list[int] | str | None, n_blocks: int) -> set[int] | None:
    """Block indices selected by ``LoRAConfig.layers``; None means every block.

    Raises:
        LoRAConfigError: If an index is out of range or a slice selects no block.
    """
    if layers is None:
        return None
    if n_blocks == 0:
        raise LoRAConfigError(
            f"layers={layers!r}, but no module path contains a numbered block (layers.N, h.N, layer.N, blocks.N); "
            "remove `layers` or select modules with a regex target instead."
        )
    if isinstance(layers, str):
        selected = set(range(n_blocks)[parse_layer_slice(layers)])
        if not selected:
            raise LoRAConfigError(f"layers={layers!r} selects no block of the model's {n_blocks} blocks (0..{n_blocks - 1}).")
        return selected
    bad = [i for i in layers if not -n_blocks <= i < n_blocks]
    if bad:
        raise LoRAConfigError(
            f"layers={layers!r}: indices {bad} are out of range; the model has {n_blocks} blocks, "
            f"valid indices are {-n_blocks}..{n_blocks - 1}."
        )
    return {i % n_blocks for i in layers}


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by path, without the insides of LoRA wrappers (their base layers and factors)."""
    from lightning_lora.surgery.lora.layer import LoRALayer

    found: dict[str, nn.Module] = {}
    wrapped_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in wrapped_prefixes):
            continue
        found[name] = module
        if isinstance(module, LoRALayer):
            wrapped_prefixes.append(f"{name}.")
    return found


def output_head_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """Paths of the model's output head(s), excluded from ``"all-linear"``.

    Heads of transformers models anywhere inside ``model`` count, so that adapting a LightningModule that holds the
    network as ``self.model`` leaves out ``model.lm_head`` just as adapting the network itself leaves out ``lm_head``.
    """
    heads: set[str] = set()
    for path, module in modules.items():
        get_output = getattr(module, "get_output_embeddings", None)
        if path and not callable(get_output):
            continue
        output = get_output() if callable(get_output) else None
        if output is not None:
            heads |= {n for n, m in modules.items() if m is output}
        prefix = f"{path}." if path else ""
        heads |= {f"{prefix}{name}" for name in _HEAD_NAMES if f"{prefix}{name}" in modules}
    # By structure: a Linear outside every block onto the input vocabulary (Lightning's demo Transformer `decoder`).
    vocab = {m.num_embeddings for m in modules.values() if isinstance(m, nn.Embedding)}
    heads |= {n for n, m in modules.items()
              if isinstance(m, nn.Linear) and block_index(n) is None and m.out_features in vocab}
    return heads


def matches_name(pattern: str, module_name: str) -> bool:
    """PEFT's list semantics: the path equals the pattern or ends with ``.pattern``; ``re:`` patterns full-match."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module_name) is not None
    return module_name == pattern or module_name.endswith(f".{pattern}")


def is_attention(name: str) -> bool:
    """Whether a (linear) module path belongs to an attention block."""
    return any(_ATTENTION_PART.search(part) for part in name.split(".")[:-1]) or name.rsplit(".", 1)[-1] in {
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value", "query_key_value",
    }


def is_mlp(name: str) -> bool:
    """Whether a (linear) module path belongs to an MLP / feed-forward block."""
    if is_attention(name):
        return False
    parts = name.split(".")
    if parts[-1] in _MLP_NAMES or any(p in _MLP_PARTS for p in parts[:-1]):
        return True
    # BERT: `encoder.layer.N.output.dense` is the second MLP projection (attention's is `attention.output.dense`).
    return len(parts) >= 2 and parts[-2:] == ["output", "dense"] and block_index(name) is not None


def match_pattern(pattern: str, model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Paths that one target pattern selects; presets select only layers LoRA can wrap."""
    if pattern in PRESETS:
        adaptable = [n for n, m in modules.items() if _adaptable(m)]
        if pattern == "all-linear":
            heads = output_head_names(model, modules)
            return [n for n in adaptable if n not in heads]
        keep = is_attention if pattern == "attention" else is_mlp
        return [n for n in adaptable if block_index(n) is not None and keep(n)]
    return [n for n in modules if n and matches_name(pattern, n)]


def _adaptable(module: nn.Module) -> bool:
    from lightning_lora.surgery.lora.layer import LoRALayer

    return isinstance(module, LoRALayer) or codec_for(module) is not None


def closest_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Module names (full paths and last components) closest to a pattern, for 'did you mean' messages."""
    pool = set()
    for name in names:
        if name:
            pool.add(name)
            pool.add(name.rsplit(".", 1)[-1])
    key = pattern[3:] if pattern.startswith("re:") else pattern
    return difflib.get_close_matches(key, sorted(pool), n=n, cutoff=0.4)


def unmatched_error(kind: str, patterns: list[str], modules: dict[str, nn.Module]) -> TargetMatchError:
    """One error for every pattern that matched nothing, each with the closest real names."""
    lines = []
    for pattern in patterns:
        close = closest_names(pattern, modules)
        hint = f"closest module names: {', '.join(close)}" if close else "no similar module name"
        lines.append(f"{kind} pattern {pattern!r} matched no module ({hint}).")
    presets = ", ".join(repr(p) for p in PRESETS)
    return TargetMatchError(
        "\n".join(lines)
        + f"\nPatterns match a module path or its last components (e.g. 'q_proj'), 're:<regex>' full-matches the path,"
        f" and the presets are {presets}. Run plan_lora(model, config) to see what a config selects."
    )


def select(model: nn.Module, cfg: LoRAConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Apply ``targets``, ``exclude``, ``modules_to_save`` and ``layers``: (selected paths, skipped (path, reason)).

    Raises:
        TargetMatchError: If a pattern matches nothing, or nothing adaptable is left.
        LoRAConfigError: If ``layers`` does not fit the model.
    """
    modules = candidate_modules(model)
    selected = union_matches(cfg.targets, "target", model, modules)
    skipped: list[tuple[str, str]] = []
    for name in [n for n in selected if not _adaptable(modules[n])]:
        selected.remove(name)
        skipped.append((name, f"{type(modules[name]).__name__} is not a supported layer type ({', '.join(supported_names())})"))
    for name in [n for n in selected if _parent_is_mha(n, modules)]:
        selected.remove(name)
        skipped.append((name, "inside nn.MultiheadAttention, which reads the weight directly and would bypass an adapter"))
    for name in sorted(set(selected) & set(union_matches(cfg.exclude, "exclude", model, modules))):
        selected.remove(name)
        skipped.append((name, "excluded"))
    for name in [n for n in selected if any(matches_name(p, n) or _inside(p, n) for p in cfg.modules_to_save)]:
        selected.remove(name)
        skipped.append((name, "in modules_to_save (trained fully instead)"))
    blocks = resolve_layers(cfg.layers, num_blocks(model))
    if blocks is not None:
        for name in [n for n in selected if block_index(n) not in blocks]:
            selected.remove(name)
            skipped.append((name, f"outside layers={cfg.layers!r}"))
    if not selected:
        raise TargetMatchError(_nothing_left_message(cfg, skipped) + _mha_hint(skipped, modules))
    return selected, skipped


def _parent_is_mha(name: str, modules: dict[str, nn.Module]) -> bool:
    parent = modules.get(name.rpartition(".")[0])
    return isinstance(parent, nn.MultiheadAttention)


def _mha_hint(skipped: list[tuple[str, str]], modules: dict[str, nn.Module]) -> str:
    """What to target instead when only nn.MultiheadAttention projections matched (it is not supported)."""
    if not any(_parent_is_mha(name, modules) for name, _ in skipped):
        return ""
    others = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if block_index(n) is not None and _adaptable(m) and not _parent_is_mha(n, modules)})
    instead = f"targets={others!r} (the feed-forward layers)" if others else "a model with separate q/k/v Linear layers"
    return ("\nnn.MultiheadAttention keeps q, k and v in one fused parameter (in_proj_weight) and reads out_proj's "
            f"weight directly, so its attention cannot take LoRA adapters here; use {instead}.")


def _inside(pattern: str, name: str) -> bool:
    return not pattern.startswith("re:") and f".{pattern}." in f".{name}"


def union_matches(patterns: list[str], kind: str, model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Paths matched by any of ``patterns``, in model order; every pattern must match something.

    Raises:
        TargetMatchError: Naming each pattern that matched nothing, with the closest module names.
    """
    selected: dict[str, None] = {}
    unmatched = []
    for pattern in patterns:
        hits = match_pattern(pattern, model, modules)
        if not hits:
            unmatched.append(pattern)
        selected.update(dict.fromkeys(hits))
    if unmatched:
        raise unmatched_error(kind, unmatched, modules)
    return [n for n in modules if n in selected]  # model order (as plans promise), not pattern order


def _nothing_left_message(cfg: LoRAConfig, skipped: list[tuple[str, str]]) -> str:
    shown = "\n".join(f"  - {name}: {reason}" for name, reason in skipped[:10])
    more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return (
        f"targets={cfg.targets!r} (exclude={cfg.exclude!r}, layers={cfg.layers!r}) left no layer to adapt. "
        f"Matched but skipped:\n{shown}{more}\nWiden `targets` or `layers`, or narrow `exclude`."
    )
