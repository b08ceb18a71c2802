"""Apply, merge, unmerge and unload LoRA: every function validates everything first, then mutates.

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
from collections.abc import Mapping

from torch import Tensor, nn

from lightning_lora.surgery.codecs import codec_for
from lightning_lora.surgery.config import LoRAConfig
from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.layers import AdapterSpec, LoRALayer
from lightning_lora.surgery.merge_bases import MergeBase, merge_onto_base_, needs_merge_base
from lightning_lora.surgery.registry import adapter_configs, find_lora_root, lora_layers, record_config
from lightning_lora.surgery.report import LoRAPlan, PlannedLayer, SurgeryReport, count_parameters
from lightning_lora.surgery.targets import block_index, candidate_modules, matches_name, select

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
    selected, skipped = select(model, config)
    modules = candidate_modules(model)
    layers = []
    for path in selected:
        module = modules[path]
        if isinstance(module, LoRALayer):
            if name in module.specs:
                raise SurgeryError(
                    f"{path!r} already has a LoRA adapter named {name!r}. Applying LoRA twice is refused: pass another "
                    f"`name=` to add a second adapter, or call unload_lora(model) first to start again."
                )
            kind, (fan_in, fan_out) = module.codec.name, (module.in_features, module.out_features)
        else:
            codec = codec_for(module)
            kind, (fan_in, fan_out) = codec.name, codec.features(module)
        layers.append(PlannedLayer(path, kind, fan_in, fan_out, block_index(path), config.rank_for(path),
                                   config.alpha_for(path), config.scale_for(path)))
    return LoRAPlan(adapter=name, layers=layers, skipped=skipped)


def _check_new_name(name: str) -> None:
    # Adapters are keys of nn.ParameterDict / nn.ModuleDict, which refuse keys with a dot and keys that shadow their
    # own attributes ("copy", "keys", "to"...); refusing here keeps a failed add_adapter from half-changing a model.
    taken = isinstance(name, str) and (hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name))
    if not isinstance(name, str) or not name or "." in name or taken:
        raise SurgeryError(f"Adapter name {name!r} cannot be used: give a non-empty name without '.' that is not an "
                           "attribute of nn.ParameterDict / nn.ModuleDict (such as 'copy', 'keys', 'to'), e.g. 'legal'.")


def apply_lora(model: nn.Module, config: LoRAConfig, *, name: str = DEFAULT_ADAPTER) -> SurgeryReport:
    """Wrap the selected layers with LoRA adapter ``name`` and freeze everything else, in place.

    A fresh adapter changes no output (B starts at zero). Trainable afterwards: the new adapter's A and B, the
    modules in ``config.modules_to_save`` and the biases chosen by ``config.bias``. Adding a second adapter under
    another name is allowed; the earlier adapters are frozen.

    Args:
        model: The model to change, in place.
        config: What to adapt and how.
        name: The adapter's name. Default: ``"default"``.

    Returns:
        A :class:`SurgeryReport` with the wrapped layers and trainable / total parameter counts.

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
        module.add_adapter(name, AdapterSpec(layer.r, layer.alpha, config.dropout, config.use_rslora, config.init))
        # New modules start in training mode: follow the wrapped layer, so that adapter dropout stays off in a model
        # that is in eval mode (e.g. load_adapter for inference). PEFT's get_peft_model leaves them in training mode.
        module.train(module.base_layer.training)
    record_config(model, name, config)
    set_trainable(model, name)
    trainable, total = count_parameters(model)
    report = SurgeryReport(name, replaced, extended, plan.skipped, trainable, total, plan.adapter_params)
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
    from lightning_lora.surgery.targets import unmatched_error

    modules = candidate_modules(model)
    missing = [p for p in config.modules_to_save if not any(matches_name(p, n) for n in modules if n)]
    if missing:
        raise unmatched_error("modules_to_save", missing, modules)


def set_trainable(model: nn.Module, name: str = DEFAULT_ADAPTER) -> None:
    """Freeze everything, then unfreeze adapter ``name``, its ``modules_to_save`` and the biases its config chose.

    Raises:
        SurgeryError: If no LoRA layer has an adapter called ``name`` (nothing is frozen then).
    """
    config = adapter_configs(model).get(name)
    _check_adapter_names(lora_layers(model), [name], "set_trainable")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        if name in layer.specs:
            layer.lora_A[name].requires_grad_(True)
            layer.lora_B[name].requires_grad_(True)
            if config is not None and config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    if config is None:
        return
    root_prefix, root = find_lora_root(model)
    if config.bias == "all":
        for pname, param in root.named_parameters():
            if pname.endswith("bias") and not _is_adapter_param(pname):
                param.requires_grad_(True)
    for path in modules_to_save_paths(root, config):
        for param in root.get_submodule(path).parameters():
            param.requires_grad_(True)


def _is_adapter_param(pname: str) -> bool:
    return ".lora_A." in pname or ".lora_B." in pname


def modules_to_save_paths(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Paths of the modules that ``config.modules_to_save`` selects (outermost matches only)."""
    paths: list[str] = []
    for path in candidate_modules(model):
        if path and any(matches_name(p, path) for p in config.modules_to_save):
            if not any(path.startswith(f"{kept}.") for kept in paths):
                paths.append(path)
    return paths


def merge_lora(model: nn.Module, *, adapters: list[str] | None = None, unload: bool = True, safe: bool = True,
               merge_base: MergeBase = "dequantized", original: nn.Module | Mapping[str, Tensor] | None = None) -> nn.Module:
    """Merge adapters into the base weights, in place: ``W <- W + scale * B A`` (computed in fp32, cast once).

    On a 4-bit base (QLoRA) the weights the update is added to are chosen by ``merge_base``; on a dense model it has
    no effect. :func:`~lightning_lora.surgery.merge_bases.compare_merge_bases` measures what each choice costs.

    Args:
        model: A model with LoRA layers.
        adapters: Which adapters to merge. Default: the active ones in each layer.
        unload: Replace every wrapper by its (merged) base layer, giving a plain model, as PEFT's
            ``merge_and_unload``. With False the wrappers stay, keep a copy of the original weight, and
            :func:`unmerge_lora` restores it bit for bit. Default: True.
        safe: Check that every merged weight is finite before changing any layer. Default: True.
        merge_base: For 4-bit layers: ``"dequantized"`` (``dequant(W4) + s B A`` in a dense layer: reproduces the
            trained QLoRA model), ``"original"`` (``W_orig + s B A`` from ``original``), or ``"requantize"``
            (``quant(dequant(W4) + s B A)``: stays 4-bit, the update is rounded). With the first two every 4-bit
            layer becomes a plain ``nn.Linear`` in the dtype it had before quantization. Default: ``"dequantized"``.
        original: The high-precision weights for ``merge_base="original"``: the unquantized model or its state
            dict (keys ``<path>.weight``, matched by path suffix). Default: None.

    Returns:
        The model (the same object, changed in place; a plain model when ``unload``).

    Raises:
        MergeError: If a merge would produce inf or NaN (naming the layer), or ``merge_base`` / ``original`` do not
            fit the model; nothing is changed then.
        SurgeryError: If the model has no LoRA layer, or ``adapters`` names an adapter it does not have.
    """
    layers = _require_layers(model, "merge_lora")
    _check_adapter_names(layers, adapters, "merge_lora")
    if needs_merge_base(model, merge_base, original):
        todo = [(path, layer, _to_merge(layer, adapters)) for path, layer in layers]
        merge_onto_base_(model, todo, merge_base=merge_base, original=original, unload=unload, safe=safe)
        if unload:
            _replace_wrappers(model, layers)
        return model
    if safe:
        for path, layer in layers:
            layer.check_merge(_to_merge(layer, adapters), path)
    for _, layer in layers:
        layer.merge(_to_merge(layer, adapters), keep_original=not unload)
    if unload:
        _replace_wrappers(model, layers)
    return model


def _check_adapter_names(layers: list[tuple[str, LoRALayer]], adapters: list[str] | None, what: str) -> None:
    # Without this check a typo would merge nothing and, with unload=True, silently drop every adapter.
    known = sorted({n for _, layer in layers for n in layer.specs})
    unknown = [a for a in (adapters or []) if a not in known]
    if unknown:
        raise SurgeryError(f"{what}: no adapter named {', '.join(map(repr, unknown))} on this model (adapters: {known}).")


def _to_merge(layer: LoRALayer, adapters: list[str] | None) -> list[str]:
    names = layer.active_adapters if adapters is None else [a for a in adapters if a in layer.specs]
    return [n for n in names if n not in layer.merged_adapters]


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora(model, unload=False) <merge_lora>`, in place; unmerged layers are left as they are."""
    for _, layer in _require_layers(model, "unmerge_lora"):
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA wrapper without merging, in place: the model is the base model again.

    Merged adapters are unmerged first, so the result always has the original base weights. Parameters keep the
    ``requires_grad`` they had (the base stays frozen); the recorded adapter configs are dropped.
    """
    layers = _require_layers(model, "unload_lora")
    for _, layer in layers:
        layer.unmerge()
    _replace_wrappers(model, layers)
    return model


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, LoRALayer]]:
    layers = lora_layers(model)
    if not layers:
        raise SurgeryError(f"{what}: the model has no LoRA layers; apply_lora(model, config) or load_adapter(...) first.")
    return layers


def _replace_wrappers(model: nn.Module, layers: list[tuple[str, LoRALayer]]) -> None:
    for path, layer in layers:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    _, root = find_lora_root(model)
    adapter_configs(root).clear()
