"""Files of the non-LoRA methods: PEFT's format for prompt / P- / prefix tuning, our own for bottleneck adapters.

Prompt tuning, P-tuning, prefix tuning (``peft_type`` ``PROMPT_TUNING`` / ``P_TUNING`` / ``PREFIX_TUNING``):
``adapter_config.json`` with PEFT 0.21's fields and ``adapter_model.safetensors`` with one tensor,
``prompt_embeddings`` -- the virtual tokens, or for P-tuning and projected prefixes the encoder's *output* (PEFT
loads these files for inference only). What PEFT's format drops (the P-tuning encoder, the prefix projection) is
kept in a sidecar, ``lightning_lora_encoder.safetensors`` (the encoder's state dict; our config as JSON in its
metadata), so our own files can continue training. A PEFT-saved P-tuning or projected-prefix file (no sidecar)
loads as fixed virtual tokens: a ``PromptTuningConfig`` / ``PrefixTuningConfig(projection=False)`` adapter with
the same outputs.

Bottleneck adapters (PEFT has none): ``adapter_config.json`` = ``{"peft_type": "BOTTLENECK", "library":
"lightning-lora", "config": <BottleneckConfig fields>, "base_model_name_or_path": ...}`` and
``adapter_model.safetensors`` with ``<projection path>.down.weight`` ``(m, d)``, ``.down.bias`` ``(m,)``,
``.up.weight`` ``(d, m)``, ``.up.bias`` ``(d,)`` for each adapted projection (paths relative to the model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_lora.surgery.errors import AdapterLoadError, SurgeryError
from lightning_lora.surgery.io.atomic import atomic_dir
from lightning_lora.surgery.methods._common import model_dims
from lightning_lora.surgery.methods.apply import add_peft_adapter, bottleneck_sites
from lightning_lora.surgery.methods.bottleneck import HOST as BOTTLENECK_HOST
from lightning_lora.surgery.methods.bottleneck import BottleneckConfig
from lightning_lora.surgery.methods.p_tuning import PTuningConfig
from lightning_lora.surgery.methods.prefix_tuning import PrefixTuningConfig
from lightning_lora.surgery.methods.prompt_tuning import PromptTuningConfig
from lightning_lora.surgery.methods.virtual_tokens import host_of

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "lightning_lora_encoder.safetensors"
METHOD_TYPES = {"PROMPT_TUNING": PromptTuningConfig, "P_TUNING": PTuningConfig, "PREFIX_TUNING": PrefixTuningConfig,
                "BOTTLENECK": BottleneckConfig}
_PEFT_TYPE = {cls: key for key, cls in METHOD_TYPES.items()}
_INIT_TO_PEFT = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}


def method_state_dict(root: nn.Module, name: str, config: Any) -> dict[str, Tensor]:
    """The tensors the adapter file holds (PEFT's ``prompt_embeddings``, or the bottleneck weights), on CPU."""
    with torch.no_grad():
        if isinstance(config, BottleneckConfig):
            tensors = {f"{path}.{key}": p for path, _, _ in bottleneck_sites(root, config)
                       for key, p in root.get_submodule(f"{path}.{BOTTLENECK_HOST}").adapters[name].named_parameters()}
        else:
            tensors = {"prompt_embeddings": host_of(root).encoders[name].peft_embeddings()}
    return {k: v.detach().float().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_method_adapter(root: nn.Module, path: str | Path, name: str, config: Any, *, task_type: str | None,
                        base_model: str | None) -> Path:
    """Write a non-LoRA adapter to directory ``path`` (see the module docstring for the layout), atomically."""
    body = _config_body(root, config, task_type, base_model)
    tensors = method_state_dict(root, name, config)
    sidecar = _sidecar(root, name, config)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        if sidecar is not None:
            state, meta = sidecar
            save_file(state, str(tmp / SIDECAR_NAME), metadata=meta)
    log.info("Saved %s adapter %r to %s", config.method, name, path)
    return Path(path)


def _config_body(root: nn.Module, config: Any, task_type: str | None, base_model: str | None) -> dict[str, Any]:
    if isinstance(config, BottleneckConfig):
        return {"peft_type": "BOTTLENECK", "library": "lightning-lora", "config": config.to_dict(),
                "base_model_name_or_path": base_model}
    dims = model_dims(root, config.method)
    body: dict[str, Any] = {
        "peft_type": _PEFT_TYPE[type(config)], "task_type": task_type or "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": config.num_virtual_tokens, "num_transformer_submodules": 1, "num_layers": dims.num_layers,
        "token_dim": dims.hidden, "num_attention_heads": _heads(root), "inference_mode": True, "revision": None,
        "modules_to_save": None, "auto_mapping": None,
    }
    if isinstance(config, PromptTuningConfig):
        body.update(prompt_tuning_init=_INIT_TO_PEFT[config.init], prompt_tuning_init_text=config.init_text,
                    tokenizer_name_or_path=config.tokenizer, tokenizer_kwargs=None)
    elif isinstance(config, PTuningConfig):
        body.update(encoder_reparameterization_type=config.encoder.upper(),
                    encoder_hidden_size=config.hidden_size(dims), encoder_num_layers=config.encoder_num_layers,
                    encoder_dropout=config.encoder_dropout)
    else:  # PEFT's prefix layout counts key/value heads (grouped-query attention): token_dim = kv_heads * head_dim
        body.update(token_dim=dims.kv_dim, num_attention_heads=dims.kv_heads, prefix_projection=config.projection,
                    encoder_hidden_size=config.projection_hidden_size or dims.hidden, init_weights=None)
    return body


def _heads(root: nn.Module) -> int:
    config = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
    return int(config.num_attention_heads)


def _sidecar(root: nn.Module, name: str, config: Any) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    needs = isinstance(config, PTuningConfig) or (isinstance(config, PrefixTuningConfig) and config.projection)
    if not needs:
        return None
    encoder = host_of(root).encoders[name]
    state = {k: v.detach().float().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    return state, {"format": "pt", "config_class": type(config).__name__, "config": json.dumps(config.to_dict())}


def is_method_dir(path: str | Path) -> bool:
    """Whether ``path``'s ``adapter_config.json`` is of a non-LoRA method we handle."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False  # not ours to judge: the LoRA reader names the file and what is wrong with it
    return isinstance(data, dict) and data.get("peft_type") in METHOD_TYPES


def read_method_adapter(path: str | Path) -> tuple[Any, dict[str, Tensor], dict[str, Tensor] | None]:
    """Read a non-LoRA adapter directory: ``(config, file tensors, sidecar encoder state or None)``.

    The config is the one that rebuilds what is on disk: for a PEFT P-tuning / projected-prefix file without our
    sidecar, fixed virtual tokens (see the module docstring).

    Raises:
        FileNotFoundError: If a file is missing.
        AdapterLoadError: If the config cannot be read as one of our methods.
    """
    directory = Path(path)
    data = json.loads((directory / CONFIG_NAME).read_text())
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {str(directory)!r}.")
    tensors = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    sidecar_file = directory / SIDECAR_NAME
    if sidecar_file.is_file():
        with safe_open(str(sidecar_file), framework="pt") as handle:
            meta = handle.metadata() or {}
        cls = {c.__name__: c for c in METHOD_TYPES.values()}.get(meta.get("config_class", ""))
        if cls is None:
            raise AdapterLoadError(f"{sidecar_file}: no lightning-lora config in its metadata; delete it to load the "
                                   "PEFT file alone.")
        return cls.from_dict(json.loads(meta["config"])), tensors, load_file(str(sidecar_file), device="cpu")
    try:
        return _config_from_peft(data), tensors, None
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: cannot be read as a {data.get('peft_type')} adapter "
                               f"({err}).") from err


def _config_from_peft(data: dict[str, Any]) -> Any:
    kind, n = data["peft_type"], int(data.get("num_virtual_tokens", 0))
    if kind == "BOTTLENECK":
        return BottleneckConfig.from_dict(data["config"])
    if kind == "PROMPT_TUNING":
        init = {v: k for k, v in _INIT_TO_PEFT.items()}.get(data.get("prompt_tuning_init"), "random")
        text = data.get("prompt_tuning_init_text") if init == "text" else None
        return PromptTuningConfig(n, init=init if init != "text" or text else "random", init_text=text,
                                  tokenizer=data.get("tokenizer_name_or_path") if text else None)
    if kind == "P_TUNING":  # PEFT keeps only the encoder's output: fixed virtual tokens
        log.info("PEFT P-tuning file without the encoder: loading its virtual tokens as a prompt-tuning adapter.")
        return PromptTuningConfig(n)
    return PrefixTuningConfig(n)  # a projected prefix is stored as its output: the flat prefixes


def load_method_adapter(root: nn.Module, path: str | Path, name: str) -> Any:
    """Check the adapter in ``path`` against ``root``, then attach it as adapter ``name`` (inactive, frozen).

    Returns:
        The config it was attached with.

    Raises:
        AdapterLoadError: If its tensors do not fit the model (every problem listed); nothing is changed then.
    """
    config, tensors, sidecar = check_method_fits(root, path)
    add_peft_adapter(root, config, name)
    with torch.no_grad():
        if isinstance(config, BottleneckConfig):
            for key, value in tensors.items():
                path_, _, leaf = key.rpartition(".")
                site, _, part = path_.rpartition(".")
                param = getattr(getattr(root.get_submodule(f"{site}.{BOTTLENECK_HOST}").adapters[name], part), leaf)
                param.copy_(value.to(param.dtype))
        else:
            encoder = host_of(root).encoders[name]
            if sidecar is not None:
                encoder.load_state_dict(sidecar)
            else:
                encoder.embedding.weight.copy_(tensors["prompt_embeddings"].to(encoder.embedding.weight.dtype))
    return config


def check_method_fits(root: nn.Module, path: str | Path) -> tuple[Any, dict[str, Tensor], dict[str, Tensor] | None]:
    """Read the adapter in ``path`` and check its tensors' names and shapes against ``root``; nothing changes.

    Raises:
        AdapterLoadError: Listing every missing, unexpected or mis-shaped tensor.
    """
    config, tensors, sidecar = read_method_adapter(path)
    try:
        expected = _expected_shapes(root, config)
    except SurgeryError as err:
        raise AdapterLoadError(f"The adapter in {str(path)!r} does not fit this model: {err}") from err
    problems = [f"{k}: missing from the file" for k in expected if k not in tensors]
    problems += [f"{k}: not expected by this model" for k in tensors if k not in expected]
    problems += [f"{k}: file {tuple(v.shape)} vs model {expected[k]}" for k, v in tensors.items()
                 if k in expected and tuple(v.shape) != expected[k]]
    if problems:
        raise AdapterLoadError(f"The adapter in {str(path)!r} does not fit this model; nothing was changed.\n  "
                               + "\n  ".join(problems[:10]))
    return config, tensors, sidecar


def _expected_shapes(root: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    if isinstance(config, BottleneckConfig):
        shapes: dict[str, tuple[int, ...]] = {}
        for path, _, d in bottleneck_sites(root, config):
            m = config.width(d)
            shapes.update({f"{path}.down.weight": (m, d), f"{path}.down.bias": (m,), f"{path}.up.weight": (d, m),
                           f"{path}.up.bias": (d,)})
        return shapes
    dims = model_dims(root, config.method)
    width = dims.num_layers * 2 * dims.kv_dim if isinstance(config, PrefixTuningConfig) else dims.hidden
    return {"prompt_embeddings": (config.num_virtual_tokens, width)}

