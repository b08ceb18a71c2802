"""Add, apply and unload LoRA adapters: every function validates everything first, then mutates.

``add_adapter`` is the primitive (wrap and record, nothing else); ``apply_lora`` is ``add_adapter`` + activate +
``set_trainable``. Merging lives in :mod:`lightning_lora.surgery.lora.merge`.

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, apply_lora, merge_lora
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> report = apply_lora(model, LoRAConfig(r=2, targets=["0"]))
    >>> report.replaced
    ['0']
    >>> model = merge_lora(model)  # plain layers again, with W + (alpha/r) B A
"""

from __future__ import annotations

import logging

from torch import nn

from lightning_lora.surgery.errors import LoRAConfigError, SurgeryError
from lightning_lora.surgery.lora.active import check_adapter_names
from lightning_lora.surgery.lora.codecs import codec_for
from lightning_lora.surgery.lora.config import LoRAConfig, pattern_key_matches
from lightning_lora.surgery.lora.inventory import (
    adapter_configs,
    adapter_parameters,
    find_lora_root,
    lora_layers,
    record_config,
)
from lightning_lora.surgery.lora.layer import AdapterSpec, LoRALayer
from lightning_lora.surgery.lora.report import LoRAPlan, PlannedLayer, SurgeryReport, count_parameters
from lightning_lora.surgery.lora.targets import (
    block_index,
    candidate_modules,
    closest_names,
    matches_name,
    select,
    unmatched_error,
)
from lightning_lora.surgery.lora.tied import tied_with, weight_sharers

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"


def plan_lora(model: nn.Module, config: LoRAConfig, *, name: str = DEFAULT_ADAPTER) -> LoRAPlan:
    """Dry run: which layers ``config`` would wrap, with shapes, block indices and parameter counts.

    The model is not changed.

    Args:
        model: Any ``nn.Module`` (a transformers model, a LightningModule's backbone...).
        config: What to adapt.
        name: The adapter's name. Default: ``"default"``.

    Returns:
        A :class:`LoRAPlan`; ``print(plan)`` shows a table.

    Raises:
        TargetMatchError: If a pattern matches nothing (the message lists the closest module names).
        SurgeryError: If a selected layer already has an adapter called ``name``, or ``name`` cannot be a key of
            the adapter containers.
    """
    _check_new_name(name)
    layers, skipped = planned_layers(model, config)
    modules = candidate_modules(model)
    for layer in layers:
        module = modules[layer.name]
        if isinstance(module, LoRALayer) and name in module.specs:
            raise SurgeryError(
                f"{layer.name!r} already has a LoRA adapter named {name!r}. Applying LoRA twice is refused: pass another "
                f"`name=` to add a second adapter, or call unload_lora(model) first to start again."
            )
        if isinstance(module, LoRALayer) and module.merged_adapters:
            raise SurgeryError(
                f"{layer.name!r} has adapters {module.merged_adapters} merged into its weight; a new adapter cannot be "
                f"added to a merged layer. Call unmerge_lora(model) first (or merge_lora(model) to get a plain model)."
            )
    return LoRAPlan(adapter=name, layers=layers, skipped=skipped)


def planned_layers(model: nn.Module, config: LoRAConfig) -> tuple[list[PlannedLayer], list[tuple[str, str]]]:
    """The layers ``config`` selects, with shapes and per-layer rank / alpha, and the matches skipped (with why).

    Unlike :func:`plan_lora` this checks no adapter name, so it also tells what an adapter file must hold.

    Raises:
        TargetMatchError: If a pattern matches nothing.
        LoRAConfigError: If ``layers`` does not fit the model, or a ``rank_pattern`` / ``alpha_pattern`` key
            matches none of the selected layers (a typo would otherwise be ignored silently).
    """
    selected, skipped = select(model, config)
    _check_pattern_keys(config, selected)
    modules = candidate_modules(model)
    sharers = weight_sharers(model)
    layers = []
    for path in selected:
        module = modules[path]
        if isinstance(module, LoRALayer):
            kind, (fan_in, fan_out) = module.codec.name, (module.in_features, module.out_features)
        else:
            codec = codec_for(module)
            kind, (fan_in, fan_out) = codec.name, codec.features(module)
        layers.append(PlannedLayer(path, kind, fan_in, fan_out, block_index(path), config.rank_for(path),
                                   config.alpha_for(path), config.scale_for(path),
                                   tuple(tied_with(module, path, sharers))))
    return layers, skipped


def _check_pattern_keys(config: LoRAConfig, selected: list[str]) -> None:
    problems = []
    for field_name, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in patterns:
            if not any(pattern_key_matches(key, path) for path in selected):
                close = closest_names(key, selected)
                problems.append(f"{field_name} key {key!r} matches none of the {len(selected)} selected layers"
                                + (f"; closest: {close}" if close else "") + ".")
    if problems:
        raise LoRAConfigError("Invalid LoRAConfig for this model:\n  - " + "\n  - ".join(problems)
                              + "\n  Keys are regexes matched against the end of a module path at a dot, e.g. "
                              "'q_proj' or 'layers\\.0\\.self_attn\\.q_proj'.")


def _check_new_name(name: str) -> None:
    # Adapters are keys of nn.ParameterDict / nn.ModuleDict, which refuse keys with a dot and keys that shadow their
    # own attributes ("copy", "keys", "to"...); refusing here keeps a failed add_adapter from half-changing a model.
    taken = isinstance(name, str) and (hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name))
    if not isinstance(name, str) or not name or "." in name or taken:
        raise SurgeryError(f"Adapter name {name!r} cannot be used: give a non-empty name without '.' that is not an "
                           "attribute of nn.ParameterDict / nn.ModuleDict (such as 'copy', 'keys', 'to'), e.g. 'legal'.")


def add_adapter(model: nn.Module, config: LoRAConfig, name: str = DEFAULT_ADAPTER) -> SurgeryReport:
    """Wrap the selected layers and add adapter ``name`` to them, in place; nothing else changes.

    The primitive under :func:`apply_lora`: the new adapter is *not* active and its factors are frozen
    (``requires_grad=False``); no other parameter's trainability and no other adapter's activation is touched.
    Compose with :func:`~lightning_lora.set_active_adapters` and :func:`set_trainable`.

    Args:
        model: The model to change, in place.
        config: What to adapt and how.
        name: The adapter's name. Default: ``"default"``.

    Returns:
        A :class:`SurgeryReport` (trainable counts as the model stands afterwards).

    Raises:
        TargetMatchError, LoRAConfigError, SurgeryError: On bad input; the model is then left unchanged.
    """
    plan = plan_lora(model, config, name=name)  # every check happens here, before any change
    _check_modules_to_save(model, config)
    modules = candidate_modules(model)
    replaced, extended = [], []
    for layer in plan.layers:
        module = modules[layer.name]
        if not isinstance(module, LoRALayer):
            module = _wrap(model, layer.name, module)
            replaced.append(layer.name)
        else:
            extended.append(layer.name)
        spec = AdapterSpec(layer.r, layer.alpha, config.dropout, config.use_rslora, config.init)
        module.add_adapter(name, spec, active=False)
        module.lora_A[name].requires_grad_(False)
        module.lora_B[name].requires_grad_(False)
        # New modules start in training mode: follow the wrapped layer, so that adapter dropout stays off in a model
        # that is in eval mode (e.g. load_adapter for inference). PEFT's get_peft_model leaves them in training mode.
        module.train(module.base_layer.training)
    record_config(model, name, config)
    trainable, total = count_parameters(model)
    return SurgeryReport(name, replaced, extended, plan.skipped, trainable, total, plan.adapter_params)


def apply_lora(model: nn.Module, config: LoRAConfig, *, name: str = DEFAULT_ADAPTER) -> SurgeryReport:
    """Wrap the selected layers with LoRA adapter ``name`` and freeze everything else, in place.

    ``add_adapter`` + activate + ``set_trainable``. A fresh adapter changes no output (B starts at zero).
    Trainable afterwards: the new adapter's A and B, the modules in ``config.modules_to_save`` and the biases chosen
    by ``config.bias``. Adding a second adapter under another name is allowed: it becomes active beside the earlier
    ones (their updates add up; :func:`~lightning_lora.set_active_adapters` chooses), and the earlier ones are frozen.

    Args:
        model: The model to change, in place.
        config: What to adapt and how.
        name: The adapter's name. Default: ``"default"``.

    Returns:
        A :class:`SurgeryReport` with the wrapped layers and trainable / total parameter counts.

    Raises:
        TargetMatchError, LoRAConfigError, SurgeryError: On bad input; the model is then left unchanged.
    """
    report = add_adapter(model, config, name)
    for _, layer in lora_layers(model):
        if name in layer.specs and name not in layer.active_adapters:
            layer.active_adapters.append(name)
    set_trainable(model, name)
    report.trainable_params, report.total_params = count_parameters(model)
    log.info("%s", report)
    return report


def _wrap(model: nn.Module, path: str, module: nn.Module) -> LoRALayer:
    wrapper = LoRALayer(module, codec_for(module))
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, wrapper)
    _keep_torch_fastpath_off(model, parent_path, wrapper)
    return wrapper


def _keep_torch_fastpath_off(model: nn.Module, parent_path: str, wrapper: LoRALayer) -> None:
    # nn.TransformerEncoderLayer (and nn.TransformerEncoder's nested-tensor path) run a fused kernel in eval mode
    # that reads `linear1.weight` directly and would bypass the adapter. Both skip that path when a module inside
    # has a forward hook or `use_nested_tensor` is off; we set both, on these instances only.
    parts = parent_path.split(".") if parent_path else []
    chain = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    if any(isinstance(m, nn.TransformerEncoderLayer) for m in chain):
        wrapper.register_forward_pre_hook(_no_op_hook)
    for m in chain:
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def _no_op_hook(module: nn.Module, args: tuple) -> None:
    return None


def _check_modules_to_save(model: nn.Module, config: LoRAConfig) -> None:
    modules = candidate_modules(model)
    missing = [p for p in config.modules_to_save if not any(matches_name(p, n) for n in modules if n)]
    if missing:
        raise unmatched_error("modules_to_save", missing, modules)


def set_trainable(model: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
    """Freeze everything, then unfreeze adapter ``name``: its factors, ``modules_to_save`` and the biases it trains.

    Raises:
        UnknownAdapterError: If the model has no adapter called ``name`` (nothing is frozen then).
    """
    check_adapter_names(model, [name], "set_trainable")
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapter_parameters(model, name).values():
        param.requires_grad_(True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA wrapper without merging, in place: the model is the base model again.

    Merged adapters are unmerged first, so the result always has the original base weights. Parameters keep the
    ``requires_grad`` they had (the base stays frozen); the recorded adapter configs are dropped.
    """
    layers = require_lora_layers(model, "unload_lora")
    for _, layer in layers:
        layer.unmerge()
    unwrap_layers(model, layers)
    return model


def require_lora_layers(model: nn.Module, what: str) -> list[tuple[str, LoRALayer]]:
    """The model's LoRA layers, or a :class:`SurgeryError` saying ``what`` needs some."""
    layers = lora_layers(model)
    if not layers:
        raise SurgeryError(f"{what}: the model has no LoRA layers; apply_lora(model, config) or load_adapter(...) first.")
    return layers


def unwrap_layers(model: nn.Module, layers: list[tuple[str, LoRALayer]]) -> None:
    """Put each wrapper's base layer back in its place and forget the recorded LoRA configs, in place."""
    for path, layer in layers:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    _, root = find_lora_root(model)
    configs = adapter_configs(root)
    for name in [n for n, c in configs.items() if isinstance(c, LoRAConfig)]:  # other methods' adapters stay
        del configs[name]
