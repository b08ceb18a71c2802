"""Compare the adapter methods on the demo task: one example config per method, trained and measured alike.

For each of ``lora_attention``, ``prompt_tuning``, ``p_tuning``, ``prefix_tuning`` and ``bottleneck`` (the configs
in ``examples/``; what was chosen per method is written in each config's header): train with
``lightning-lora fit --config examples/<name>.yaml`` plus a ``MergeAndExport`` callback, then measure, on the same
machine, the forward latency of the base model, of the unmerged adapter and (LoRA only) of the merged model on a
fixed batch, and the adapter directory's size. The table goes to ``examples/results/methods.md`` (pasted into the
README), the records to ``methods.json``, and a plot of accuracy vs trainable parameters to ``methods.png``.

Usage (needs a quiet machine: timings are taken here):
    .venv/bin/python examples/method_comparison.py [--steps 40] [--only prompt_tuning,bottleneck]
    .venv/bin/python examples/method_comparison.py --smoke --model <tiny model dir> --out <dir>   # what the tests run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ["lora_attention", "prompt_tuning", "p_tuning", "prefix_tuning", "bottleneck"]


def train(name: str, steps: int, out: Path, model: str | None, in_process: bool) -> dict:
    """Train one config (a subprocess, so peak RSS is per run; in-process for ``--smoke``) and return its record."""
    export = {"class_path": "lightning_lora.callbacks.MergeAndExport",
              "init_args": {"dirpath": str(out / name / "export"), "module": "model"}}
    held_out = {"class_path": "lightning_lora.modules.held_out.HeldOutAccuracy",
                "init_args": {"results_file": str(out / name / "results.json"), "name": name}}
    args = ["fit", "--config", f"examples/{name}.yaml", "--trainer.max_steps", str(steps),
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out / name),
            "--trainer.logger", "false", "--trainer.callbacks+", json.dumps(export),
            "--trainer.callbacks+", json.dumps(held_out)]
    if model is not None:
        args += ["--model.model", model, "--data.max_eval_samples", "2"]
    print(f"[methods] {name}: lightning-lora {' '.join(args)}", flush=True)
    start = time.perf_counter()
    if in_process:
        from lightning_lora.cli import main

        main(args)
    else:
        subprocess.run([str(Path(sys.executable).with_name("lightning-lora")), *args], cwd=REPO, check=True)
    record = json.loads((out / name / "results.json").read_text())
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    return record


def _latency(model: torch.nn.Module, batch: dict, repeats: int) -> float:
    with torch.no_grad():
        model(**batch)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(**batch)
    return (time.perf_counter() - start) / repeats


def measure(record: dict, out: Path, model_name: str, repeats: int) -> None:
    """Add latencies (base, unmerged, merged for LoRA) and the adapter's size on disk to ``record``, in place."""
    from lightning_lora import load_adapter, merge_lora
    from lightning_lora.modules.loading import load_causal_lm

    base, tokenizer = load_causal_lm(model_name, dtype="float32")
    base.eval()
    ids = tokenizer(["Normalise the date 19 Jun 2011 to ISO 8601."] * 8, return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    adapter = out / record["name"] / "export" / "adapter"
    record["adapter_bytes"] = sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())
    record["latency_base_s"] = _latency(base, batch, repeats)
    adapted = copy.deepcopy(base)
    load_adapter(adapted, adapter)
    record["latency_unmerged_s"] = _latency(adapted, batch, repeats)
    record["latency_merged_s"] = None
    if record["name"].startswith("lora"):
        record["latency_merged_s"] = _latency(merge_lora(adapted), batch, repeats)


def table(records: list[dict], steps: int, smoke: bool) -> str:
    """A markdown table of the records."""
    where = f"{platform.processor() or platform.machine()}, {date.today().isoformat()}"
    lines = [
        ("SMOKE RUN (tiny random model, numbers mean nothing). " if smoke else "")
        + f"Demo task, {steps} steps of batch 8, greedy exact match on the held-out rows; {where}. "
        "Reproduce: `.venv/bin/python examples/method_comparison.py`.",
        "",
        "| method | trainable params | % | exact match before | after | s/step | peak RSS (MiB) | latency vs base "
        "(unmerged) | merged | adapter file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        pct = 100 * r["trainable_params"] / r["total_params"]
        per_step = r["train_seconds"] / max(r.get("steps", steps), 1)
        merged = "-" if r["latency_merged_s"] is None else f"{r['latency_merged_s'] / r['latency_base_s']:.2f}x"
        lines.append(f"| `{r['name']}` | {r['trainable_params']:,} | {pct:.3f}% | {r['accuracy_before']:.1%} | "
                     f"{r['accuracy_after']:.1%} | {per_step:.2f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['latency_unmerged_s'] / r['latency_base_s']:.2f}x | {merged} | "
                     f"{r['adapter_bytes'] / 1024:,.1f} KiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Train and measure every method (or a subset) and write the table, records and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="Training steps per method (default 40).")
    parser.add_argument("--only", type=str, default=None, help="Comma-separated subset of the method configs.")
    parser.add_argument("--smoke", action="store_true", help="1 step, 2 held-out rows, in-process, on --model.")
    parser.add_argument("--model", type=str, default=None, help="Model name or path. Default: each config's.")
    parser.add_argument("--out", type=Path, default=None, help="Output directory. Default: examples/results.")
    args = parser.parse_args(argv)
    steps = 1 if args.smoke else args.steps
    results = args.out or REPO / "examples" / "results"
    runs = results / "runs" if args.out else REPO / "out" / "methods"
    results.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.only.split(",") if args.only else METHODS:
        record = train(name, steps, runs, args.model, in_process=args.smoke)
        measure(record, runs, args.model or "smollm2-135m-instruct", repeats=2 if args.smoke else 20)
        records.append(record)
    (results / "methods.json").write_text(json.dumps({"steps": steps, "records": records}, indent=2) + "\n")
    (results / "methods.md").write_text(table(records, steps, args.smoke))
    sys.path.insert(0, str(REPO / "examples"))
    from experiments import plot

    plot(records, results / "methods.png")
    print(table(records, steps, args.smoke))


if __name__ == "__main__":
    main()
