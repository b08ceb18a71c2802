"""``apply_peft`` / ``plan_peft``: every method through one entry, dispatching on the config's type.

LoRA goes to :func:`~lightning_lora.apply_lora`; the others are attached here: bottleneck adapters to each
selected block's output projections, prompt / P- / prefix tuning to the model's virtual-token host. Everything is
validated before the model changes; afterwards the adapter is recorded with its config on the model (so
``list_adapters``, ``adapter_parameters``, ``set_trainable``, checkpoints and files see it like a LoRA adapter).

Example:
    >>> from lightning_lora import BottleneckConfig, apply_peft
    >>> from tests.factories import tiny_llama  # doctest: +SKIP
    >>> report = apply_peft(tiny_llama(), BottleneckConfig(size=8))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.lora.active import list_adapters
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER, apply_lora, plan_lora, set_trainable
from lightning_lora.surgery.lora.codecs import codec_for
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.inventory import record_config
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.report import LoRAPlan, SurgeryReport, count_parameters
from lightning_lora.surgery.lora.targets import (
    block_index,
    candidate_modules,
    is_attention,
    is_mlp,
    num_blocks,
    resolve_layers,
)
from lightning_lora.surgery.methods import virtual_tokens
from lightning_lora.surgery.methods._common import model_dims
from lightning_lora.surgery.methods.bottleneck import HOST as BOTTLENECK_HOST
from lightning_lora.surgery.methods.bottleneck import Bottleneck, BottleneckConfig, BottleneckHost, apply_host_hook
from lightning_lora.surgery.methods.p_tuning import PromptEncoder, PTuningConfig
from lightning_lora.surgery.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from lightning_lora.surgery.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, init_prompt_embedding

log = logging.getLogger(__name__)

PEFTConfig = Union[LoRAConfig, PromptTuningConfig, PTuningConfig, PrefixTuningConfig, BottleneckConfig]
CONFIG_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (LoRAConfig, PromptTuningConfig, PTuningConfig,
                                                                 PrefixTuningConfig, BottleneckConfig)}
"""Every method's config class by name (checkpoints store the name)."""
VIRTUAL_TOKEN_CONFIGS = (PromptTuningConfig, PTuningConfig, PrefixTuningConfig)
_ATTENTION_OUT = {"o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin"}
_MLP_OUT = {"down_proj", "fc2", "c_proj", "dense", "dense_4h_to_h", "w2", "lin2", "fc_out"}


@dataclass
class PEFTPlan:
    """The dry run of :func:`plan_peft`: where a non-LoRA adapter would go and how many parameters it adds.

    Attributes:
        adapter: The adapter's name.
        method: The method, in words (``"prefix tuning"``...).
        modules: ``(module path, what goes there, parameters)`` per attachment point.
    """

    adapter: str
    method: str
    modules: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def adapter_params(self) -> int:
        """Parameters the adapter would add."""
        return sum(params for _, _, params in self.modules)

    def __str__(self) -> str:
        rows = "\n".join(f"  {path or '<model>'}: {what} ({params:,} parameters)"
                         for path, what, params in self.modules)
        return f"{self.method} adapter {self.adapter!r}: {self.adapter_params:,} parameters\n{rows}"


def plan_peft(model: nn.Module, config: PEFTConfig, *, name: str = DEFAULT_ADAPTER) -> LoRAPlan | PEFTPlan:
    """Dry run of :func:`apply_peft`: what would be added where, with parameter counts; the model is not changed.

    Raises:
        TypeError: If ``config`` is not one of the method configs.
        SurgeryError: If ``name`` is taken or the model cannot take the method (the message says why).
        ConfigError, TargetMatchError: If the config does not fit the model.
    """
    if isinstance(config, LoRAConfig):
        return plan_lora(model, config, name=name)
    _check_name(model, name)
    if isinstance(config, BottleneckConfig):
        return PEFTPlan(name, config.method, [(path, f"bottleneck {d} -> {config.width(d)} -> {d} ({where})",
                                               2 * d * config.width(d) + config.width(d) + d)
                                              for path, where, d in bottleneck_sites(model, config)])
    if isinstance(config, VIRTUAL_TOKEN_CONFIGS):
        dims = model_dims(model, f"{config.method} ({type(config).__name__})")
        what = f"{config.num_virtual_tokens} virtual tokens" + (" per block (keys and values)"
                                                                 if isinstance(config, PrefixTuningConfig) else "")
        return PEFTPlan(name, config.method, [(virtual_tokens.HOST, what, config.num_parameters(dims))])
    raise TypeError(f"config={config!r}: expected one of LoRAConfig, PromptTuningConfig, PTuningConfig, "
                    "PrefixTuningConfig, BottleneckConfig.")


def add_peft_adapter(model: nn.Module, config: PEFTConfig, name: str = DEFAULT_ADAPTER) -> PEFTPlan:
    """Attach a (non-LoRA) adapter ``name``, in place: inactive, frozen, recorded; nothing else changes.

    The primitive under :func:`apply_peft` (as ``add_adapter`` is for LoRA).
    """
    plan = plan_peft(model, config, name=name)  # every check happens here, before any change
    if isinstance(config, BottleneckConfig):
        for path, _, d in bottleneck_sites(model, config):
            _bottleneck_host(model, path, d).adapters[name] = Bottleneck(d, config.width(d), config.nonlinearity)
            _bottleneck_host(model, path, d).specs[name] = config
    else:
        host = virtual_tokens.host_of(model, create=True)
        host.encoders[name] = _encoder(model, config)
        host.specs[name] = config
    _place_like_model(model, name)
    record_config(model, name, config)
    return plan


def apply_peft(model: nn.Module, config: PEFTConfig, *, name: str = DEFAULT_ADAPTER) -> SurgeryReport:
    """Add adapter ``name`` of any method, make it active and trainable, and freeze everything else, in place.

    ``LoRAConfig`` -> :func:`~lightning_lora.apply_lora`. A fresh bottleneck adapter changes no output (its up
    projection starts at zero); virtual tokens change outputs from the start, as in PEFT. Another virtual-token
    adapter that was active is switched off (one applies at a time); LoRA and bottleneck adapters stay active.

    Args:
        model: The model to change (a transformers model for the virtual-token methods).
        config: ``LoRAConfig``, ``PromptTuningConfig``, ``PTuningConfig``, ``PrefixTuningConfig`` or
            ``BottleneckConfig``.
        name: The adapter's name. Default: ``"default"``.

    Returns:
        A :class:`~lightning_lora.SurgeryReport` (``replaced``: the modules that received the adapter).

    Raises:
        SurgeryError, ConfigError, TargetMatchError: On bad input; the model is then left unchanged.
    """
    if isinstance(config, LoRAConfig):
        return apply_lora(model, config, name=name)
    plan = add_peft_adapter(model, config, name)
    for _, host in _hosts(model, name):
        if isinstance(host, virtual_tokens.VirtualTokens):
            host.active_adapters[:] = [n for n in host.active_adapters if n == name]
        host.active_adapters.append(name)
    set_trainable(model, name)
    trainable, total = count_parameters(model)
    report = SurgeryReport(name, [path for path, _, _ in plan.modules], [], [], trainable, total, plan.adapter_params)
    log.info("%s", report)
    return report


def bottleneck_sites(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str, int]]:
    """``(projection path, "attention" | "mlp", width)`` for every place ``config`` puts an adapter.

    Raises:
        SurgeryError: If a selected block has no recognisable attention / MLP output projection.
    """
    modules = candidate_modules(model)
    chosen = resolve_layers(config.layers, num_blocks(model))
    wanted = ("attention", "mlp") if config.placement == "houlsby" else ("mlp",)
    sites: dict[tuple[int, str], tuple[str, int]] = {}
    for path, module in modules.items():
        block, leaf = block_index(path), path.rsplit(".", 1)[-1]
        if block is None or (chosen is not None and block not in chosen) or "intermediate" in path.split("."):
            continue
        kind = "attention" if leaf in _ATTENTION_OUT and is_attention(path) else (
            "mlp" if leaf in _MLP_OUT and is_mlp(path) else None)
        if kind in wanted and (block, kind) not in sites and (width := _out_features(module)) is not None:
            sites[(block, kind)] = (path, width)
    blocks = sorted(chosen) if chosen is not None else list(range(num_blocks(model)))
    missing = [f"block {b}: {k}" for b in blocks for k in wanted if (b, k) not in sites]
    if missing or not blocks:
        raise SurgeryError(f"BottleneckConfig(placement={config.placement!r}): no output projection found for "
                           f"{missing or 'any block'}. Recognised names: attention {sorted(_ATTENTION_OUT)}, MLP "
                           f"{sorted(_MLP_OUT)}. HINT: use LoRA for this architecture, or placement='pfeiffer'.")
    return [(path, kind, width) for (_, kind), (path, width) in sites.items()]  # model order (dicts keep it)


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, LoRALayer):
        return module.out_features
    try:
        return codec_for(module).features(module)[1]
    except Exception:  # not a layer we can read (any codec failure): not a site
        return None


def _bottleneck_host(model: nn.Module, path: str, width: int) -> BottleneckHost:
    module = model.get_submodule(path)
    host = module._modules.get(BOTTLENECK_HOST)
    if host is None:
        host = BottleneckHost(width)
        module.add_module(BOTTLENECK_HOST, host)
        module.register_forward_hook(apply_host_hook)
    return host


def _encoder(model: nn.Module, config: PEFTConfig) -> nn.Module:
    dims = model_dims(model, config.method)
    if isinstance(config, PromptTuningConfig):
        encoder = PromptEmbedding(config, dims)
        init_prompt_embedding(encoder, config, model.get_input_embeddings())
        return encoder
    if isinstance(config, PTuningConfig):
        return PromptEncoder(config, dims)
    return PrefixEncoder(config, dims)


def _hosts(model: nn.Module, name: str) -> list[tuple[str, Any]]:
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, (BottleneckHost, virtual_tokens.VirtualTokens)) and name in m.specs]


def _place_like_model(model: nn.Module, name: str) -> None:
    # New adapter tensors start frozen, fp32, on the model's device, in the model's train / eval mode.
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for _, host in _hosts(model, name):
        for param in host.adapter_params()[name].values():
            param.requires_grad_(False)
        host.to(device)
        host.train(model.training)


def _check_name(model: nn.Module, name: str) -> None:
    taken = isinstance(name, str) and (hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name))
    if not isinstance(name, str) or not name or "." in name or taken:
        raise SurgeryError(f"Adapter name {name!r} cannot be used: give a non-empty name without '.' that is not an "
                           "attribute of nn.ModuleDict (such as 'copy', 'keys', 'to'), e.g. 'legal'.")
    if name in list_adapters(model):
        raise SurgeryError(f"The model already has an adapter named {name!r}; pass another `name=`, or "
                           "delete_adapter(model, name) first.")
