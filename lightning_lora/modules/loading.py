"""Load a causal language model and its tokenizer from an alias, a local directory or a hub name.

Example:
    >>> model, tokenizer = load_causal_lm("smollm2-135m-instruct")  # doctest: +SKIP
    >>> tokenizer.pad_token is not None  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from lightning_lora.modules.smollm2 import smollm2_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
# Names that resolve to a directory this package can produce offline.
MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": smollm2_dir,
    "smollm2": smollm2_dir,
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _accepted() -> str:
    return (
        f"an alias ({', '.join(repr(a) for a in MODEL_ALIASES)}), a local directory with a config.json, "
        "or a Hugging Face Hub name like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model alias, local directory or hub name into what ``from_pretrained`` accepts.

    Args:
        name_or_path: An alias from :data:`MODEL_ALIASES` (the bundled model is converted on first use),
            a local directory, or a hub name of the form ``org/name``.

    Returns:
        A local directory path, or the hub name unchanged.

    Raises:
        FileNotFoundError: If ``name_or_path`` is none of the accepted forms, or is a directory without a
            ``config.json``.
    """
    alias = name_or_path.strip().lower()
    if alias in MODEL_ALIASES:
        return str(MODEL_ALIASES[alias]())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{name_or_path!r} is a directory but holds no config.json or tokenizer_config.json; "
                "point at a directory written by save_pretrained"
            )
        return str(path)
    if _HUB_NAME.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise FileNotFoundError(f"model {name_or_path!r} not found: no such directory. Accepted: {_accepted()}")


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a dtype name to a ``torch.dtype``.

    ``"auto"`` is the dtype to *load* in: ``torch.get_default_dtype()``, i.e. float32 unless a Lightning ``*-true``
    precision has set another default around ``configure_model``. Whether the frozen weights then move to bf16 is
    decided later, once it is known which weights train: see :mod:`lightning_lora.modules.precision` (the built-in
    module) and :func:`lightning_lora.surgery.quant.cpu_precision.auto_dtype` (how this machine is judged).

    Raises:
        ValueError: If ``dtype`` is not one of ``auto``, ``float32``, ``bfloat16``, ``float16``.
    """
    if dtype == "auto":
        return torch.get_default_dtype()
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: 'auto', {', '.join(repr(d) for d in _DTYPES)}")
    return _DTYPES[dtype]


def _from_pretrained(loader: Callable[..., object], resolved: str, name_or_path: str, **kwargs: object) -> object:
    try:
        return loader(resolved, **kwargs)
    except OSError as err:
        if Path(resolved).is_dir():
            raise
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory, and loading it from the Hugging Face Hub failed "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). Accepted: {_accepted()}"
        ) from err


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, with a pad token (the EOS token if it has none).

    Args:
        name_or_path: As for :func:`resolve_model_path`.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: See :func:`resolve_model_path`.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, resolved, name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: DtypeName = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: An alias (``"smollm2-135m-instruct"``, ``"smollm2"``), a local directory written by
            ``save_pretrained``, or a hub name ``org/name``.
        dtype: Weight dtype to load in; ``"auto"`` loads float32 (see :func:`resolve_dtype`). Default: ``"auto"``.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token and the model's generation config knows it. For an alias,
        ``model.config.name_or_path`` is the alias (what saved adapters record as their base model).

    Raises:
        FileNotFoundError: If the model cannot be found (the message lists what is accepted).
        ValueError: If ``dtype`` is unknown.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(name_or_path)
    resolved = resolve_model_path(name_or_path)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, resolved, name_or_path, dtype=torch_dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    alias = name_or_path.strip().lower()
    if alias in MODEL_ALIASES:
        # Saved adapters record this as base_model_name_or_path: the alias works on any machine, the cache path
        # it resolved to only on this one.
        model.config.name_or_path = alias
    log.info("loaded %s (%s, %.1fM parameters)", resolved, torch_dtype, model.num_parameters() / 1e6)
    return model, tokenizer


def load_causal_lm_on_meta(name_or_path: str, dtype: DtypeName = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build a causal LM from its config with its parameters on the meta device (no memory), and its tokenizer.

    The weights are read later, after the surgery and the sharding, by
    :func:`lightning_lora.surgery.training.sharded_loading.materialize_and_load_` (each rank only its rows).

    Returns:
        ``(model, tokenizer)``; the model's ``name_or_path`` and generation config are those of the directory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from lightning_lora.surgery.training.sharded_loading import parameters_on_meta

    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(name_or_path)
    resolved = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(resolved)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.config._name_or_path = resolved  # as from_pretrained sets it: part of the base fingerprint
    try:
        model.generation_config = GenerationConfig.from_pretrained(resolved)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("built %s on the meta device (%s, %.1fM parameters)", resolved, torch_dtype, model.num_parameters() / 1e6)
    return model, tokenizer
