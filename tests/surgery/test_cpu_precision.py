"""How "auto" precision decides between bf16 and fp32 on CPU: both branches (probe monkeypatched), the flag gate,
the environment override, and QuantConfig(compute_dtype="auto") following the 4-bit probe."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lora import QuantConfig
from lightning_lora.surgery.quant import cpu_precision
from lightning_lora.surgery.quant.cpu_precision import (
    ENV_VAR,
    CpuCapabilities,
    auto_cpu_dtype,
    auto_dtype,
    cpu_capabilities,
)


def caps(native: bool) -> CpuCapabilities:
    return CpuCapabilities(model_name="test CPU", torch_capability="AVX512" if native else "AVX2", avx2=True,
                           avx512=native, avx512_bf16=native, amx=False)  # fmt: skip


@pytest.fixture
def decide(monkeypatch: pytest.MonkeyPatch):
    """Let auto decide from (monkeypatched) capabilities and probe ratios instead of the suite's fp32 pin."""
    monkeypatch.delenv(ENV_VAR, raising=False)

    def setup(native: bool, ratio: float | None) -> list[str]:
        probed: list[str] = []

        def probe(kind: str):
            def run() -> float:
                if ratio is None:
                    raise AssertionError("the probe must not run without native bf16 instructions")
                probed.append(kind)
                return ratio
            return run

        monkeypatch.setattr(cpu_precision, "cpu_capabilities", lambda: caps(native))
        monkeypatch.setattr(cpu_precision, "bf16_probe_ratio", probe("dense"))
        monkeypatch.setattr(cpu_precision, "bf16_4bit_probe_ratio", probe("4bit"))
        return probed

    return setup


def test_native_bf16_and_a_faster_probe_give_bf16(decide) -> None:
    probed = decide(native=True, ratio=0.45)
    assert auto_cpu_dtype() == torch.bfloat16
    assert auto_dtype("cpu") == torch.bfloat16
    assert probed == ["dense", "dense"]


def test_native_bf16_but_a_slow_probe_gives_fp32(decide) -> None:
    decide(native=True, ratio=0.95)  # flags present, but bf16 is not clearly faster here
    assert auto_cpu_dtype() == torch.float32


def test_without_native_bf16_it_is_fp32_and_nothing_is_timed(decide) -> None:
    decide(native=False, ratio=None)  # the probe raises if called
    assert auto_cpu_dtype() == torch.float32
    assert QuantConfig().compute_dtype_for(torch.device("cpu")) == torch.float32


def test_quant_config_auto_follows_the_4bit_probe(decide) -> None:
    probed = decide(native=True, ratio=0.5)
    assert QuantConfig(compute_dtype="auto").compute_dtype_for(torch.device("cpu")) == torch.bfloat16
    assert probed == ["4bit"]
    decide(native=True, ratio=2.2)  # e.g. bitsandbytes' bf16 backward slower than fp32 on this CPU
    assert QuantConfig(compute_dtype="auto").compute_dtype_for(torch.device("cpu")) == torch.float32
    assert QuantConfig(compute_dtype="bfloat16").compute_dtype_for(torch.device("cpu")) == torch.bfloat16  # override


def test_environment_variable_overrides_both_ways(decide, monkeypatch: pytest.MonkeyPatch) -> None:
    decide(native=False, ratio=None)
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    assert auto_cpu_dtype() == torch.bfloat16
    monkeypatch.setenv(ENV_VAR, "float32")
    decide(native=True, ratio=0.1)
    assert auto_cpu_dtype() == torch.float32


def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "bf16")
    with pytest.raises(ValueError, match=r"LIGHTNING_LORA_AUTO_DTYPE='bf16' is not valid; use 'float32' or 'bfloat16'"):
        auto_cpu_dtype()


def test_capabilities_match_the_kernel_flags_and_the_probe_measures() -> None:
    # torch's private feature probes; if an upgrade moves them, /proc/cpuinfo still answers, but say so here.
    assert all(hasattr(torch.cpu, f"_is_{n}_supported") for n in ("avx2", "avx512", "avx512_bf16", "amx_tile"))
    found = cpu_capabilities()
    assert found.model_name and found.torch_capability == torch.backends.cpu.get_cpu_capability()
    flags = cpu_precision._proc_cpuinfo_flags()
    if flags:  # Linux: torch's detection agrees with the kernel's
        assert found.avx2 == ("avx2" in flags) and found.avx512_bf16 == ("avx512_bf16" in flags)
        assert found.amx == ("amx_tile" in flags)
    assert found.as_dict()["native_bf16"] == (found.amx or found.avx512_bf16)
    ratio = cpu_precision.bf16_probe_ratio()
    assert math.isfinite(ratio) and ratio > 0
