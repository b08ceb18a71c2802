"""The 4-bit quantization configuration (QLoRA's frozen base): a dataclass validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lightning_lora.surgery.errors import ConfigError, QuantConfigError
from lightning_lora.surgery.lora.config import ConfigDict

QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
QuantStorage = Literal["uint8", "float16", "bfloat16", "float32"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts


@dataclass(frozen=True)
class QuantConfig(ConfigDict):
    """How to quantize the frozen base model to 4 bits with bitsandbytes, as in QLoRA (Dettmers et al. 2023).

    Example:
        >>> QuantConfig(quant_type="nf4", double_quant=True, targets="all-linear", exclude=["lm_head"])  # doctest: +SKIP

    Args:
        bits: Bits per weight. Only 4 is supported (NF4 / FP4 with bitsandbytes ``Linear4bit``). Default: 4.
        quant_type: ``"nf4"`` (4-bit NormalFloat, the QLoRA data type, best for normally distributed weights) or
            ``"fp4"``. Default: ``"nf4"``.
        double_quant: Quantize the per-block scales too (bitsandbytes ``compress_statistics``): about 0.37 bit per
            parameter saved, NF4 then costs about 4.13 bits per parameter. Default: True.
        blocksize: Weights per quantization block, one scale each: one of 32, 64, 128, 256, 512, 1024, 2048, 4096.
            Smaller blocks are more accurate and cost more scales. Default: 64.
        compute_dtype: dtype of the matmul: ``"auto"`` (bfloat16 on CUDA, float16 on GPUs without bf16; on CPU
            bfloat16 where a timed probe of a 4-bit layer's forward + backward finds it faster, which needs AMX or
            AVX512-BF16, else float32: see :func:`~lightning_lora.surgery.quant.cpu_precision.auto_4bit_compute_dtype`),
            ``"float32"``, ``"bfloat16"`` or ``"float16"``. Default: ``"auto"``.
        quant_storage: dtype of the tensor that stores the packed 4-bit values. ``"uint8"`` for single-device and DDP;
            for FSDP, the dtype of the other parameters (e.g. ``"bfloat16"``) so that it can shard them together.
            Default: ``"uint8"``.
        targets: Which ``nn.Linear`` layers to quantize, in :class:`~lightning_lora.LoRAConfig`'s syntax: module
            names (``"q_proj"`` matches every path ending in ``.q_proj``), ``"re:<regex>"``, or a preset
            (``"all-linear"``: every linear layer except the output head; ``"attention"``; ``"mlp"``).
            Default: ``"all-linear"``.
        exclude: Patterns in the same syntax whose matches stay in full precision. Default: none.
    """

    bits: Literal[4] = 4
    quant_type: QuantType = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: ComputeDtype = "auto"
    quant_storage: QuantStorage = "uint8"
    targets: list[str] | str = "all-linear"
    exclude: list[str] | str | None = field(default=None)

    error_type: ClassVar[type[ConfigError]] = QuantConfigError

    def __post_init__(self) -> None:
        # Frozen, as LoRAConfig: validated once, never changed behind the validation's back.
        object.__setattr__(self, "targets", [self.targets] if isinstance(self.targets, str) else list(self.targets))
        object.__setattr__(self, "exclude", [self.exclude] if isinstance(self.exclude, str) else list(self.exclude or []))
        problems = _problems(self)
        if problems:
            raise QuantConfigError("Invalid QuantConfig:\n  - " + "\n  - ".join(problems))

    def __hash__(self) -> int:
        return hash(repr(self))

    def compute_dtype_for(self, device: torch.device) -> torch.dtype:
        """The matmul dtype on ``device``, resolving ``"auto"``."""
        if self.compute_dtype != "auto":
            return getattr(torch, self.compute_dtype)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            from lightning_lora.surgery.quant.cpu_precision import auto_4bit_compute_dtype

            return auto_4bit_compute_dtype()
        return torch.float32

    @property
    def storage_dtype(self) -> torch.dtype:
        """``quant_storage`` as a ``torch.dtype``."""
        return getattr(torch, self.quant_storage)


def _problems(cfg: QuantConfig) -> list[str]:
    problems = []
    if cfg.bits != 4 or isinstance(cfg.bits, bool):
        problems.append(f"bits={cfg.bits!r}: only 4-bit quantization is supported (bitsandbytes Linear4bit); use bits=4.")
    if cfg.quant_type not in ("nf4", "fp4"):
        problems.append(f"quant_type={cfg.quant_type!r}: must be 'nf4' (QLoRA's NormalFloat, recommended) or 'fp4'.")
    if not isinstance(cfg.double_quant, bool):
        problems.append(f"double_quant={cfg.double_quant!r}: must be True or False.")
    if cfg.blocksize not in BLOCKSIZES or isinstance(cfg.blocksize, bool):
        problems.append(f"blocksize={cfg.blocksize!r}: must be one of {list(BLOCKSIZES)} (64 is QLoRA's choice).")
    if cfg.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"compute_dtype={cfg.compute_dtype!r}: must be 'auto', 'float32', 'bfloat16' or 'float16'.")
    if cfg.quant_storage not in ("uint8", "float16", "bfloat16", "float32"):
        problems.append(f"quant_storage={cfg.quant_storage!r}: must be 'uint8', 'float16', 'bfloat16' or 'float32'.")
    for name, patterns in (("targets", cfg.targets), ("exclude", cfg.exclude)):
        problems += _pattern_problems(name, patterns, required=name == "targets")
    return problems


def _pattern_problems(name: str, patterns: list[Any], *, required: bool) -> list[str]:
    if required and not patterns:
        return [f"{name}=[]: give at least one pattern, e.g. 'all-linear' or ['q_proj', 'v_proj']."]
    problems = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            problems.append(f"{name} pattern {pattern!r}: patterns are non-empty strings.")
        elif pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                problems.append(f"{name} pattern {pattern!r}: not a valid regular expression ({err}).")
    return problems
