"""Merge time: lightning-lora's ``merge_lora`` vs PEFT's ``merge_and_unload``, interleaved on the same weights.

One seeded random Llama (``LLAMA_33M``: hidden 512, 8 layers) with an all-linear r16 adapter (random, non-zero B)
in both libraries. Each round merges a fresh deep copy (the copy is not timed) with, in a seeded random order:
ours ``safe=True`` (the default), ours ``safe=False``, PEFT ``safe_merge=False`` (PEFT's default) and PEFT
``safe_merge=True``. Ratios are medians over rounds of ``time(ours) / time(PEFT)`` within the same round, so that
both sides share one time window of a shared machine.

Usage::

    python -m benchmarks.merge_speed [--rounds 15] [--threads 2] [--out benchmarks/results/merge_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.settings import LLAMA_33M, LORA

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "merge_speed.json"
RUNS = (("ours", True), ("ours", False), ("peft", False), ("peft", True))


def build(config: dict[str, Any] = LLAMA_33M, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Ours and PEFT's adapted model, identical weights (all-linear, r16, B random)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora import LoRAConfig, apply_lora, lora_layers

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                          target_modules="all-linear"))
    apply_lora(base, LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], targets="all-linear"))
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for path, layer in lora_layers(base):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=generator) * 0.02)
            theirs[path].lora_A["default"].weight.copy_(layer.lora_A["default"])
            theirs[path].lora_B["default"].weight.copy_(layer.lora_B["default"])
    return base.eval(), peft.eval()


def _merge(model: nn.Module, impl: str, safe: bool) -> nn.Module:
    if impl == "peft":
        return model.merge_and_unload(safe_merge=safe)
    from lightning_lora import merge_lora

    return merge_lora(model, safe=safe)


def run(rounds: int = 15, warmup: int = 2) -> dict[str, Any]:
    """Time every merge ``rounds`` times; returns medians (ms) and paired ratios, and the max weight difference."""
    ours, peft = build()
    models = {"ours": ours, "peft": peft}
    times: dict[tuple[str, bool], list[float]] = {r: [] for r in RUNS}
    for i in range(warmup + rounds):
        order = random.Random(i).sample(RUNS, len(RUNS))
        for impl, safe in order:
            fresh = copy.deepcopy(models[impl])
            start = time.perf_counter()
            _merge(fresh, impl, safe)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[(impl, safe)].append(elapsed)
            del fresh
    merged_ours, merged_peft = _merge(copy.deepcopy(ours), "ours", True), _merge(copy.deepcopy(peft), "peft", False)
    diff = max((a - b).abs().max().item() for a, b in zip(merged_ours.state_dict().values(),
                                                          merged_peft.state_dict().values()))

    def ratio(a: tuple[str, bool], b: tuple[str, bool]) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return {
        "ms": {f"{impl}_{'checked' if safe else 'unchecked'}": 1e3 * statistics.median(v) for (impl, safe), v in times.items()},
        "ours_checked_vs_peft_unchecked": ratio(("ours", True), ("peft", False)),
        "ours_unchecked_vs_peft_unchecked": ratio(("ours", False), ("peft", False)),
        "ours_checked_vs_peft_checked": ratio(("ours", True), ("peft", True)),
        "max_abs_weight_diff_vs_peft": diff, "rounds": rounds, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
