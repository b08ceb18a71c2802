"""Translation between our configs and PEFT's ``adapter_config.json`` (PEFT 0.21 field names and semantics)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from lightning_lora.surgery.errors import AdapterLoadError, ConfigError
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.targets import block_index, candidate_modules

PEFT_PREFIX = "base_model.model."
_PEFT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT's default layer-index rule


def peft_would_match(name: str, targets: list[str], layers: list[int] | None, modules_to_save: list[str]) -> bool:
    """PEFT's ``check_target_module_exists`` for list targets, so saved configs select exactly our layers."""
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
        return False
    if not (name in targets or any(name.endswith(f".{t}") for t in targets)):
        return False
    if layers is None:
        return True
    match = _PEFT_LAYER_INDEX.match(name)
    return match is not None and int(match.group("idx")) in layers


def target_modules_for(root: nn.Module, wrapped: list[str], modules_to_save: list[str]) -> tuple[list[str], list[int] | None]:
    """The shortest PEFT ``target_modules`` (+ ``layers_to_transform``) that selects exactly ``wrapped``.

    Short names (``["q_proj", "v_proj"]``) are what vLLM and people expect; full paths are the fallback when short
    names would select more than we adapted (e.g. after ``exclude``).
    """
    names = [n for n in candidate_modules(root) if n]
    wanted = set(wrapped)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    blocks = {block_index(n) for n in wrapped}
    options: list[tuple[list[str], list[int] | None]] = [(suffixes, None)]
    if None not in blocks:
        options.append((suffixes, sorted(blocks)))
    for targets, layers in options:
        if {n for n in names if peft_would_match(n, targets, layers, modules_to_save)} == wanted:
            return targets, layers
    return sorted(wanted), None


def peft_config_dict(cfg: LoRAConfig, targets: list[str], layers: list[int] | None, *, task_type: str | None,
                     base_model: str | None, fan_in_fan_out: bool) -> dict[str, Any]:
    """An ``adapter_config.json`` body that PEFT 0.21 reads as the same adapter."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "exclude_modules": None,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "inference_mode": True,
        "revision": None,
    }


_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token indices",
}


def config_from_peft(data: dict[str, Any], source: str) -> LoRAConfig:
    """A :class:`LoRAConfig` from a PEFT ``adapter_config.json`` body (written by PEFT or by us).

    Raises:
        AdapterLoadError: If it is not a LoRA adapter, or uses a PEFT feature this project does not implement.
    """
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{source}: peft_type={data.get('peft_type')!r}; only LoRA adapters ('LORA') can be loaded.")
    used = [label for key, label in _UNSUPPORTED.items() if data.get(key)]
    if used:
        raise AdapterLoadError(f"{source}: uses {', '.join(used)}, which lightning-lora does not support; load it with "
                               "PEFT instead.")
    _check_field_types(data, source)
    targets = data.get("target_modules")
    if isinstance(targets, str):
        targets = [targets if targets.lower() == "all-linear" else f"re:{targets}"]
    exclude = data.get("exclude_modules")
    if isinstance(exclude, str):
        exclude = [f"re:{exclude}"]
    layers = data.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    init = data.get("init_lora_weights", True)
    try:
        return LoRAConfig(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0)),
            targets=list(targets or []),
            exclude=list(exclude) if exclude else None,
            layers=list(layers) if layers else None,
            use_rslora=bool(data.get("use_rslora", False)),
            bias=data.get("bias", "none"),
            modules_to_save=list(data.get("modules_to_save") or []),
            init="gaussian" if init == "gaussian" else "kaiming",
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )
    except ConfigError as err:
        raise AdapterLoadError(f"{source}: the adapter config is invalid (field names as in LoRAConfig: r is PEFT's "
                               f"'r', alpha its 'lora_alpha', dropout its 'lora_dropout'); fix the file:\n{err}") from err


# PEFT field -> (accepted JSON types, what a valid value looks like). None is accepted for every optional field.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "r": ((int,), "a positive integer, e.g. 8"),
    "lora_alpha": ((int, float), "a positive number, e.g. 16"),
    "lora_dropout": ((int, float), "a number in [0, 1), e.g. 0.05"),
    "target_modules": ((list, str), 'a list of module names, e.g. ["q_proj", "v_proj"], or a regex string'),
    "exclude_modules": ((list, str), "a list of module names or a regex string"),
    "layers_to_transform": ((list, int), "a list of block indices, e.g. [0, 1]"),
    "modules_to_save": ((list,), 'a list of module names, e.g. ["lm_head"]'),
    "rank_pattern": ((dict,), 'an object of pattern -> rank, e.g. {"q_proj": 4}'),
    "alpha_pattern": ((dict,), 'an object of pattern -> alpha, e.g. {"q_proj": 8}'),
    "use_rslora": ((bool,), "true or false"),
    "bias": ((str,), '"none", "all" or "lora_only"'),
}


def _check_field_types(data: dict[str, Any], source: str) -> None:
    """Every field of the wrong JSON type, named with what is valid, in one error (before any conversion)."""
    problems = []
    for key, (types, valid) in _FIELD_TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            problems.append(f"'{key}': {value!r} is not {valid}")
    if problems:
        raise AdapterLoadError(f"{source}: invalid adapter config field(s); fix the file (or save the adapter again):\n  - "
                               + "\n  - ".join(problems))


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task type guessed from a transformers class name (``...ForCausalLM`` -> ``"CAUSAL_LM"``)."""
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


def base_model_name(model: nn.Module) -> str | None:
    """The transformers ``name_or_path`` of a model, when it has one."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None
