"""Mixed-batch multi-adapter inference: lightning-lora's ``mixed_batch`` vs PEFT's ``adapter_names``.

One base model with 16 all-linear r16 adapters (random, non-zero B), one forward over a 16 x 64 batch whose rows
use 1, 4 or 16 different adapters (assigned by a seeded shuffle, the same for both libraries), compared with the
ordinary single-adapter forward of the same library. Both models hold identical weights, run in this process with
the same threads. Every ratio compares two *neighbouring* calls (each round runs, in a random order and direction,
the blocks ``ours single, ours k, PEFT k, PEFT single`` for k = 1, 4, 16 and ``ours single, PEFT single``), so
that both sides share one time window of a noisy shared machine; ratios are medians over those pairs, times are
medians over all calls (``best_ms``: the fastest call).

Ours is timed *including* entering ``mixed_batch`` (what a server pays per batch). The stacked adapter copy that
each layer keeps is built during warm-up, as it would be once per adapter set in a server.

Usage::

    python -m benchmarks.mixed_batch [--quick] [--threads 2] [--out benchmarks/results/mixed_batch.json]

From the runner: ``rows = benchmarks.mixed_batch.run(quick)`` returns one dict per (library, adapters-per-batch):
``impl``, ``adapters_in_batch`` (``"single"`` = plain forward with one active adapter), ``ms`` (median ms per
forward), ``tokens_per_s``, ``best_ms``, ``vs_single`` (throughput / the same library's single-adapter throughput),
``vs_peft`` (our throughput / PEFT's in the same configuration), ``n`` (calls timed) and ``max_abs_diff``
(largest logit difference between the two libraries' outputs); ``cpu_ms``, ``vs_single_cpu`` and
``vs_peft_cpu`` are the same figures in process CPU time (both threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.settings import LLAMA_33M, LORA

BATCH, SEQ = 16, 64
N_ADAPTERS = 16
MIXES = (1, 4, 16)
GOAL_VS_SINGLE = 0.95
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mixed_batch.json"


def build_models(config: dict[str, Any] = LLAMA_33M, n_adapters: int = N_ADAPTERS,
                 seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Ours and PEFT's model: the same seeded random Llama with the same ``n_adapters`` adapters ``a0``, ``a1``...

    Returns:
        ``(ours, peft)``, both in eval mode, adapter ``a0`` active.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora import LoRAConfig, apply_lora, set_active_adapters

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    twin = copy.deepcopy(base)
    ours_cfg = LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets="all-linear")
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    names = [f"a{i}" for i in range(n_adapters)]
    peft = get_peft_model(twin, peft_cfg, adapter_name=names[0])
    generator = torch.Generator().manual_seed(seed + 1)
    for name in names:
        apply_lora(base, ours_cfg, name=name)
        if name != names[0]:
            peft.add_adapter(name, peft_cfg)
        _randomise_and_copy(base, peft, name, generator)
    set_active_adapters(base, names[0])
    peft.set_adapter(names[0])
    return base.eval(), peft.eval()


def _randomise_and_copy(ours: nn.Module, peft: nn.Module, name: str, generator: torch.Generator) -> None:
    from lightning_lora.surgery.lora.inventory import lora_layers

    theirs = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            b = layer.lora_B[name]
            b.copy_(torch.randn(b.shape, generator=generator) * 0.02)  # B starts at zero: make the update real
            theirs[path].lora_A[name].weight.copy_(layer.lora_A[name])
            theirs[path].lora_B[name].weight.copy_(b)


def row_names(k: int, seed: int = 0) -> list[str]:
    """``BATCH`` row names over ``k`` adapters, each used equally often, in a seeded shuffled order."""
    order = torch.randperm(BATCH, generator=torch.Generator().manual_seed(seed)).tolist()
    return [f"a{order[i] % k}" for i in range(BATCH)]


def _runners(ours: nn.Module, peft: nn.Module, ids: torch.Tensor) -> dict[tuple[str, str], Callable[[], torch.Tensor]]:
    from lightning_lora import mixed_batch

    def ours_mixed(names: list[str]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with mixed_batch(ours, names):
                return ours(input_ids=ids).logits
        return run

    def peft_mixed(names: list[str]) -> Callable[[], torch.Tensor]:
        return lambda: peft(input_ids=ids, adapter_names=names).logits

    runners = {("ours", "single"): lambda: ours(input_ids=ids).logits,
               ("peft", "single"): lambda: peft(input_ids=ids).logits}
    for k in MIXES:
        runners[("ours", str(k))] = ours_mixed(row_names(k))
        runners[("peft", str(k))] = peft_mixed(row_names(k))
    return runners


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Key = tuple[str, str]  # (impl, adapters in the batch)
Sample = tuple[float, float]  # (wall s, process CPU s) of one call


def _blocks() -> list[list[Key]]:
    """Back-to-back sequences: each mix between its own library's single-adapter run and the other library's mix,
    so that every ratio compares two neighbouring calls."""
    blocks = [[("ours", "single"), ("peft", "single")]]
    for k in map(str, MIXES):
        blocks.append([("ours", "single"), ("ours", k), ("peft", k), ("peft", "single")])
    return blocks


def measure(runners: dict[Key, Callable[[], torch.Tensor]], rounds: int,
            warmup: int) -> tuple[dict[Key, list[Sample]], dict[tuple[Key, Key], list[tuple[Sample, Sample]]]]:
    """Time every runner ``rounds`` times (after ``warmup`` rounds).

    A round runs the blocks of :func:`_blocks` in a seeded random order, each forwards or backwards (alternating),
    and records every call and every pair of neighbouring calls.

    Returns:
        The samples of each runner, and the samples of each ordered pair of neighbours.
    """
    samples: dict[Key, list[Sample]] = {k: [] for k in runners}
    pairs: dict[tuple[Key, Key], list[tuple[Sample, Sample]]] = {}
    with torch.inference_mode():
        for i in range(warmup + rounds):
            rng = random.Random(i)
            for block in rng.sample(_blocks(), len(MIXES) + 1):
                block = block if rng.random() < 0.5 else block[::-1]
                timed = []
                for key in block:
                    cpu, start = _cpu_seconds(), time.perf_counter()
                    runners[key]()
                    timed.append((key, (time.perf_counter() - start, _cpu_seconds() - cpu)))
                if i < warmup:
                    continue
                for key, sample in timed:
                    samples[key].append(sample)
                for (ka, sa), (kb, sb) in zip(timed, timed[1:]):
                    pairs.setdefault((ka, kb), []).append((sa, sb))
                    pairs.setdefault((kb, ka), []).append((sb, sa))
    return samples, pairs


def _ratio(pairs: dict[tuple[Key, Key], list[tuple[Sample, Sample]]], slow: Key, fast: Key, which: int) -> float:
    """Median over neighbouring calls of ``time(slow) / time(fast)``: the throughput of ``fast`` relative to ``slow``."""
    return statistics.median(a[which] / b[which] for a, b in pairs[(slow, fast)])


def summarise(samples: dict[Key, list[Sample]], pairs: dict[tuple[Key, Key], list[tuple[Sample, Sample]]],
              diffs: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (library, adapters in the batch), with paired ratios (see the module docstring)."""
    rows = []
    for (impl, k), values in samples.items():
        wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        single, peft = (impl, "single"), ("peft", k)
        rows.append({
            "impl": impl, "adapters_in_batch": k, "batch": f"{BATCH}x{SEQ}", "ms": 1e3 * wall,
            "tokens_per_s": BATCH * SEQ / wall, "best_ms": 1e3 * min(v[0] for v in values),
            "vs_single": _ratio(pairs, single, (impl, k), 0) if k != "single" else 1.0,
            "vs_peft": _ratio(pairs, peft, (impl, k), 0) if impl == "ours" else None,
            "cpu_ms": 1e3 * cpu,
            "vs_single_cpu": _ratio(pairs, single, (impl, k), 1) if k != "single" else 1.0,
            "vs_peft_cpu": _ratio(pairs, peft, (impl, k), 1) if impl == "ours" else None,
            "max_abs_diff": diffs.get(k), "n": len(values),
        })
    return rows


def _diffs(runners: dict[tuple[str, str], Callable[[], torch.Tensor]]) -> dict[str, float]:
    with torch.inference_mode():
        return {k: float((runners[("ours", k)]() - runners[("peft", k)]()).abs().max())
                for (impl, k) in runners if impl == "ours"}


def run(quick: bool = True, threads: int = 2) -> list[dict[str, Any]]:
    """Build both models, check they agree, time every configuration; returns the rows (see the module docstring).

    Args:
        quick: 5 timed rounds after 1 warm-up (about 3 minutes on 2 quiet cores); otherwise 11.
        threads: ``torch.set_num_threads`` during the run (restored afterwards). Default: 2.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, peft = build_models()
        ids = torch.randint(3, LLAMA_33M["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
        runners = _runners(ours, peft, ids)
        diffs = _diffs(runners)
        samples, pairs = measure(runners, rounds=5 if quick else 11, warmup=1)
    finally:
        torch.set_num_threads(previous)
    return summarise(samples, pairs, diffs)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: ours at 16 adapters >= 0.95x our single-adapter throughput, and ahead of PEFT."""
    ours16 = next(r for r in rows if r["impl"] == "ours" and r["adapters_in_batch"] == str(max(MIXES)))
    peft16 = next(r for r in rows if r["impl"] == "peft" and r["adapters_in_batch"] == str(max(MIXES)))
    return {"ours_16_vs_single": ours16["vs_single"], "goal_vs_single": GOAL_VS_SINGLE,
            "met_vs_single": ours16["vs_single"] >= GOAL_VS_SINGLE, "peft_16_vs_single": peft16["vs_single"],
            "ours_16_vs_peft_16": ours16["vs_peft"], "met_vs_peft": ours16["vs_peft"] > 1.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mixed_batch", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 11")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSON (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.quick, args.threads)
    import peft
    import transformers

    doc = {"meta": {"command": "python -m benchmarks.mixed_batch" + (" --quick" if args.quick else ""),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
                    "model": {**LLAMA_33M, "params": "33.7M"}, "lora": {**LORA, "targets": "all-linear",
                    "adapters": N_ADAPTERS}, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "peft": peft.__version__}, "wall_s": time.perf_counter() - start},
           "goals": goals(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, args.out)
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps(doc["goals"]), file=sys.stderr)


if __name__ == "__main__":
    main()
