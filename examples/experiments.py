"""Run every example config on the demo task and tabulate trainable parameters, memory, time and accuracy.

This is the partial-layer freezing / rank experiment in one command. Each config runs in its own process
(`lightning-lora fit --config examples/<name>.yaml`), so peak memory is per run; the `HeldOutAccuracy` callback in
each config writes `out/<name>/results.json`. The table goes to `examples/results/experiments.md` (pasted into the
README), the raw records to `experiments.json`, and a plot of accuracy vs trainable parameters to `experiments.png`.

Usage:
    .venv/bin/python examples/experiments.py [--steps 40] [--only lora_attention,qlora] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["lora_attention", "lora_all_linear", "lora_late_layers", "qlora", "layer_freezing", "full_finetune"]
OUT = REPO / "examples" / "results"


def run_config(name: str, steps: int) -> dict:
    """Train one config in a subprocess and return its results record (with wall time)."""
    cli = Path(sys.executable).with_name("lightning-lora")
    cmd = [str(cli), "fit", "--config", f"examples/{name}.yaml", "--trainer.max_steps", str(steps),
           "--trainer.enable_progress_bar", "false"]
    print(f"[experiments] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    record = json.loads((REPO / "out" / name / "results.json").read_text())
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    return record


def table(records: list[dict], steps: int) -> str:
    """A markdown table of the records."""
    lines = [
        f"Demo task, SmolLM2-135M-Instruct, {steps} steps of batch 8, 40 held-out rows, greedy exact match; "
        f"{platform.processor() or platform.machine()}, 2 CPU cores, {date.today().isoformat()}. "
        "Reproduce: `.venv/bin/python examples/experiments.py`.",
        "",
        "| config | trainable params | % of total | peak RSS (MiB) | train time (s) | s/step "
        "| accuracy before | accuracy after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        pct = 100 * r["trainable_params"] / r["total_params"]
        per_step = r["train_seconds"] / max(r.get("steps", steps), 1)
        lines.append(f"| `{r['name']}` | {r['trainable_params']:,} | {pct:.2f}% | {r['peak_rss_mib']:,.0f} | "
                     f"{r['train_seconds']:.0f} | {per_step:.2f} | {r['accuracy_before']:.1%} | {r['accuracy_after']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Accuracy after training vs trainable parameters (log scale), one labelled point per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        ax.scatter(r["trainable_params"], 100 * r["accuracy_after"], s=40)
        ax.annotate(r["name"], (r["trainable_params"], 100 * r["accuracy_after"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out exact match after training (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("Date normalisation, SmolLM2-135M, CPU")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the configs (or re-plot saved records) and write the table, records and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="Training steps per config (default 40).")
    parser.add_argument("--only", type=str, default=None, help="Comma-separated subset of configs.")
    parser.add_argument("--plot-only", action="store_true", help="Rebuild table and plot from experiments.json.")
    parser.add_argument("--collect", action="store_true",
                        help="Build the table from the runs already in out/<name>/results.json (no training).")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads((OUT / "experiments.json").read_text())
        records, steps = saved["records"], saved["steps"]
    else:
        names = args.only.split(",") if args.only else CONFIGS
        if args.collect:
            found = [REPO / "out" / n / "results.json" for n in names]
            records = [json.loads(p.read_text()) for p in found if p.is_file()]
        else:
            records = [run_config(n, args.steps) for n in names]
        steps = max((r.get("steps", args.steps) for r in records), default=args.steps)
        (OUT / "experiments.json").write_text(json.dumps({"steps": steps, "records": records}, indent=2) + "\n")
    (OUT / "experiments.md").write_text(table(records, steps))
    plot(records, OUT / "experiments.png")
    print(table(records, steps))


if __name__ == "__main__":
    main()
