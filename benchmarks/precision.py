"""What ``dtype="auto"`` buys on this CPU: bf16 vs fp32 for a dense linear, a 4-bit layer, and a LoRA training step.

The step: a random 6-block Llama (hidden 576, FFN 1536, 9 heads / 3 KV heads, vocab 8192), LoRA r16 on q,v, batch
8x128, AdamW; ``fp32`` vs ``auto`` as the built-in module does it on a CPU where bf16 wins (frozen weights cast to
bf16 after the surgery, forward under bf16 autocast, adapters and optimizer state fp32), and bf16 frozen weights
without autocast (the alternative that was not chosen). Steps alternate between the models, medians reported.

    python -m benchmarks.precision      # writes benchmarks/results/precision.{json,md}; a few minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_lora import LoRAConfig, apply_lora
from lightning_lora.modules.precision import autocast_to, cast_frozen_
from lightning_lora.surgery.quant import cpu_precision

OUT = Path(__file__).resolve().parent / "results"


def _model(frozen: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=9, num_key_value_heads=3)  # fmt: skip
    model = LlamaForCausalLM(config)
    apply_lora(model, LoRAConfig(r=16, alpha=32, targets=["q_proj", "v_proj"]))
    cast_frozen_(model, frozen)
    return model


def _steps(repeats: int, batch: tuple[int, int]) -> dict[str, Any]:
    ids = torch.randint(0, 8192, batch, generator=torch.Generator().manual_seed(0))  # (B, T)
    runs = {"fp32": (_model(torch.float32), None), "auto (bf16 frozen + autocast)": (_model(torch.bfloat16), torch.bfloat16),
            "bf16 frozen, no autocast": (_model(torch.bfloat16), None)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, (m, _) in runs.items()}
    for i in range(repeats + 1):  # the first round warms up
        for name, (model, dtype) in runs.items():
            start = time.perf_counter()
            with autocast_to(dtype, torch.device("cpu")):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optims[name].step()
            optims[name].zero_grad()
            if i:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"s_per_step": med, "auto_vs_fp32": med["auto (bf16 frozen + autocast)"] / med["fp32"], "repeats": repeats}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    caps = cpu_precision.cpu_capabilities()
    doc: dict[str, Any] = {
        "command": "python -m benchmarks.precision", "cpu": caps.as_dict(), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dense_linear_bf16_vs_fp32": cpu_precision.bf16_probe_ratio(), "probe_shape": list(cpu_precision.PROBE_SHAPE),
        "step": _steps(args.repeats, (8, 128)), "load_average_1m": os.getloadavg()[0],
    }  # fmt: skip
    try:
        doc["nf4_fwd_bwd_bf16_vs_fp32"] = cpu_precision.bf16_4bit_probe_ratio()
    except ImportError:
        doc["nf4_fwd_bwd_bf16_vs_fp32"] = None
    os.environ.pop(cpu_precision.ENV_VAR, None)
    doc["auto_picks"] = {"dense": str(cpu_precision.auto_cpu_dtype()), "nf4": str(cpu_precision.auto_4bit_compute_dtype())}
    step = doc["step"]
    md = ["# bf16 vs fp32 on this CPU", "", f"Command: `{doc['command']}` — {doc['date']}, {doc['threads']} threads, "
          f"1-minute load average {doc['load_average_1m']:.1f}.  ", f"CPU: {caps.model_name} (AVX2 {caps.avx2}, "
          f"AVX512-BF16 {caps.avx512_bf16}, AMX {caps.amx}).", "",
          f"- dense linear {tuple(doc['probe_shape'])}, bf16 / fp32 time: {doc['dense_linear_bf16_vs_fp32']:.2f}",
          "- NF4 layer forward + backward, bf16 / fp32 compute: "
          + ("n/a" if doc["nf4_fwd_bwd_bf16_vs_fp32"] is None else f"{doc['nf4_fwd_bwd_bf16_vs_fp32']:.2f}"),
          *(f"- LoRA q,v step, {k}: {v:.3f} s" for k, v in step["s_per_step"].items()),
          f"- auto / fp32 step: {step['auto_vs_fp32']:.2f} (median of {step['repeats']})",
          f"- auto picks here: {doc['auto_picks']}"]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(doc, indent=1) + "\n"), ("md", "\n".join(md) + "\n")):
        target = args.out / f"precision.{suffix}"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    print("\n".join(md), file=sys.stderr)


if __name__ == "__main__":
    main()
