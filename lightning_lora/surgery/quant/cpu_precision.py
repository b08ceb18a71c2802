"""What ``"auto"`` precision means on this machine: bf16 for the frozen base where bf16 matmuls are faster, else fp32.

Machines differ. On a CPU with AMX or AVX512-BF16 a bf16 matmul runs at about twice the fp32 rate or better (an Intel
Xeon with AMX: 2.3 ms vs 8.9 ms for a 1024x576 @ 576x1536 linear, per ENVIRONMENT.md; an AMD EPYC with AVX512-BF16
and no AMX: bf16 / fp32 time 0.38-0.47, ``python -m benchmarks.precision``); on a CPU with AVX2 only, torch emulates
bf16 and it is about 10x *slower*. So the choice is made at run time:

1. ``LIGHTNING_LORA_AUTO_DTYPE`` (``float32`` or ``bfloat16``), when set, decides; the tests set it to ``float32`` so
   that their results do not depend on the machine.
2. Without native bf16 instructions (AMX tiles or AVX512-BF16, read from torch's CPU feature detection) -> fp32,
   with no timing at all.
3. With them, a short timed probe (well under a second, once per process) confirms bf16 is faster at LLM-sized
   shapes. Flags alone are not enough: AMX needs the OS to grant tile state, torch's bf16 kernels may not use the
   instructions for a given build, and an implementation with narrow bf16 units could be no faster; only a
   measurement says. The probe runs the two dtypes back to back in alternating order and takes the median of the
   paired ratios (a load spike on a shared machine hits both sides of a pair), and asks for a clear margin
   (bf16 <= 0.8x fp32), so a noisy machine does not flip the decision back and forth.

Small matmuls (e.g. 128x64 @ 64x64) stay faster in fp32 even on such CPUs; the probe's shape is that of a small
LLM's projection, which is what the frozen base runs.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

ENV_VAR = "LIGHTNING_LORA_AUTO_DTYPE"
_ENV_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROBE_SHAPE = (256, 576, 1536)  # (tokens, in, out): one projection of a ~135M-parameter Llama
PROBE_MAX_RATIO = 0.8  # bf16 must take at most this fraction of the fp32 time
# The NF4 layer's ratio swung between 0.24 and 2.2 from run to run on a heavily loaded AMD EPYC (the dense one stayed
# at 0.38-0.50): ask for a clearer win there, so that an ambiguous machine stays on fp32, the long-tested path.
NF4_PROBE_MAX_RATIO = 0.6


@dataclass(frozen=True)
class CpuCapabilities:
    """The CPU's name and the instruction sets that decide bf16 speed (as torch detects them)."""

    model_name: str
    torch_capability: str
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU has bf16 matmul instructions (AMX tiles or AVX512-BF16)."""
        return self.amx or self.avx512_bf16

    def as_dict(self) -> dict[str, object]:
        """Plain dict (for JSON results)."""
        return {**asdict(self), "native_bf16": self.native_bf16}


def _cpu_flag(name: str) -> bool:
    # torch >= 2.3 exposes its own CPU feature detection (cpuinfo) as private helpers; fall back to /proc/cpuinfo.
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:  # pragma: no cover - a build without cpuinfo
            pass
    linux_flag = {"avx2": "avx2", "avx512": "avx512f", "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile"}[name]
    return linux_flag in _proc_cpuinfo_flags()


@functools.cache
def _proc_cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """Read (once) the CPU's model name and its AVX2 / AVX-512 / AVX512-BF16 / AMX support."""
    return CpuCapabilities(
        model_name=_model_name(),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        avx2=_cpu_flag("avx2"),
        avx512=_cpu_flag("avx512"),
        avx512_bf16=_cpu_flag("avx512_bf16"),
        amx=_cpu_flag("amx_tile"),
    )


def _paired_ratio(fp32: Callable[[], object], bf16: Callable[[], object], pairs: int) -> float:
    """Median over ``pairs`` rounds of (bf16 time / fp32 time), the two run back to back in alternating order, after
    one warm-up each: a load spike on a shared machine then hits both sides of a round, and the median drops outliers."""
    fp32(), bf16()  # warm-up: kernel selection, weight packing
    ratios = []
    for i in range(pairs):
        times = {}
        for name, fn in (("fp32", fp32), ("bf16", bf16)) if i % 2 == 0 else (("bf16", bf16), ("fp32", fp32)):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["bf16"] / times["fp32"])
    return statistics.median(ratios)


def _linear(dtype: torch.dtype) -> Callable[[], object]:
    tokens, n_in, n_out = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype)  # (T, in)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)  # (out, in)

    def run() -> object:
        with torch.no_grad():
            return torch.nn.functional.linear(x, w)  # (T, in) @ (in, out) -> (T, out)

    return run


@functools.cache
def bf16_probe_ratio() -> float:
    """bf16 / fp32 time of a :data:`PROBE_SHAPE` linear on this CPU (median of 9 paired rounds; once per process)."""
    ratio = _paired_ratio(_linear(torch.float32), _linear(torch.bfloat16), pairs=9)
    log.info("bf16 probe: %s linear, bf16 / fp32 time %.2f", PROBE_SHAPE, ratio)
    return ratio


def env_override() -> torch.dtype | None:
    """The dtype forced by ``LIGHTNING_LORA_AUTO_DTYPE``, or None when it is unset or empty.

    Raises:
        ValueError: If it is set to anything but ``float32`` or ``bfloat16``.
    """
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in _ENV_CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not valid; use 'float32' or 'bfloat16', or unset it to let "
                         "lightning-lora decide from the CPU")
    return _ENV_CHOICES[value]


def auto_cpu_dtype() -> torch.dtype:
    """The dtype ``"auto"`` gives the frozen base on CPU: bfloat16 where its matmuls are faster here, else float32.

    See the module docstring for how it decides. Trainable tensors and optimizer state stay float32 regardless.

    Returns:
        ``torch.bfloat16`` or ``torch.float32``.
    """
    forced = env_override()
    if forced is not None:
        return forced
    caps = cpu_capabilities()
    if not caps.native_bf16:
        return torch.float32
    return torch.bfloat16 if bf16_probe_ratio() <= PROBE_MAX_RATIO else torch.float32


def _nf4_step(compute_dtype: torch.dtype) -> Callable[[], object]:
    import bitsandbytes as bnb  # only reached when quantizing, which has already checked bitsandbytes is installed

    tokens, n_in, n_out = PROBE_SHAPE
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=compute_dtype, quant_type="nf4").to("cpu")
    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(0), requires_grad=True)  # (T, in)

    def run() -> object:
        layer(x).float().sum().backward()  # QLoRA training: forward and the input's gradient through the 4-bit base
        return x.grad

    return run


@functools.cache
def bf16_4bit_probe_ratio() -> float:
    """bf16 / fp32 compute time of a bitsandbytes NF4 layer, forward + backward, at :data:`PROBE_SHAPE`
    (median of 3 paired rounds, about 2 s on a busy 2-core machine; once per process)."""
    ratio = _paired_ratio(_nf4_step(torch.float32), _nf4_step(torch.bfloat16), pairs=3)
    log.info("bf16 4-bit probe: NF4 forward + backward, bf16 / fp32 compute time %.2f", ratio)
    return ratio


def auto_4bit_compute_dtype() -> torch.dtype:
    """The compute dtype ``QuantConfig(compute_dtype="auto")`` gives a 4-bit layer on CPU.

    As :func:`auto_cpu_dtype`, but the probe times a bitsandbytes NF4 layer's forward and backward: its bf16 path is
    a different kernel from a dense bf16 matmul, and it need not win where dense bf16 does (measured on an AMD EPYC
    with AVX512-BF16 on a loaded machine: bf16 / fp32 for forward + backward between 0.24 and 2.2 from run to run,
    against 0.38-0.50 for the dense matmul), so it gets its own measurement.
    """
    forced = env_override()
    if forced is not None:
        return forced
    if not cpu_capabilities().native_bf16:
        return torch.float32
    return torch.bfloat16 if bf16_4bit_probe_ratio() <= NF4_PROBE_MAX_RATIO else torch.float32


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` for the frozen base on ``device``: :func:`auto_cpu_dtype` on CPU, bf16 on CUDA that supports it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return auto_cpu_dtype()
    return torch.float32
