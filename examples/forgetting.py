"""Task accuracy vs forgetting on the demo task: LoRA ranks and targets, full fine-tuning, layer freezing, replay.

Each row trains through the CLI in its own process (``lightning-lora fit --config examples/<config>.yaml ...``) with
a :class:`~lightning_lora.callbacks.ForgettingMonitor` appended, which measures at fit end, on the shipped general
reference set: KL(base || tuned) per token and the reference perplexity. ``HeldOutAccuracy`` gives the task exact
match. Writes ``<out>/forgetting.md`` (the README table), ``forgetting.json`` and ``forgetting.png``.

Usage (a quiet machine: 11 rows of SmolLM2-135M training):
    .venv/bin/python examples/forgetting.py [--steps 40] [--only lora_attention_r16,full_finetune]
    .venv/bin/python examples/forgetting.py --smoke --model <tiny model dir> --out /tmp/forgetting   # wiring test
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

# name -> (example config, extra CLI arguments); alpha = 2 r throughout, as in the example configs.
ROWS: dict[str, tuple[str, list[str]]] = {
    **{f"{config}_r{r}": (config, ["--lora.r", str(r), "--lora.alpha", str(2 * r)])
       for config in ("lora_attention", "lora_all_linear") for r in (4, 16, 64)},
    "full_finetune": ("full_finetune", []),
    "layer_freezing": ("layer_freezing", []),
    **{f"lora_attention_r16_replay{ratio}": ("lora_attention", ["--data.replay", "self", "--data.replay_ratio", ratio])
       for ratio in ("0.1", "0.3")},
}
SMOKE_ROWS = ["lora_attention_r4", "full_finetune"]


def run_row(name: str, steps: int, out: Path, model: str | None, smoke: bool, workdir: Path) -> dict:
    """Train one row in a subprocess (in ``workdir``, where the configs write ``out/``); return its record."""
    config, extra = ROWS[name]
    forgetting = out.resolve() / f"{name}.forgetting.json"
    data = REPO / "examples" / "data" / "dates"
    cmd = [sys.executable, "-m", "lightning_lora.cli", "fit", "--config", str(REPO / "examples" / f"{config}.yaml"),
           *extra, "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "val.jsonl"),
           "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+=lightning_lora.callbacks.ForgettingMonitor",
           "--trainer.callbacks.results_file", str(forgetting)]
    if model is not None:
        cmd += ["--model.model", model]
    if smoke:
        cmd += ["--data.max_eval_samples", "2", "--model.max_new_tokens", "2", "--trainer.callbacks.max_length", "16"]
    print(f"[forgetting] {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True)
    record = json.loads((workdir / "out" / config / "results.json").read_text())
    final = json.loads(forgetting.read_text())["history"][-1]
    return {"name": name, "accuracy_before": record["accuracy_before"], "accuracy_after": record["accuracy_after"],
            "trainable_params": record["trainable_params"], "kl": final["kl"], "ppl": final["ppl"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def table(records: list[dict], steps: int) -> str:
    """The markdown table."""
    lines = [f"Demo task, {steps} steps of batch 8, 40 held-out rows (greedy exact match); forgetting on the "
             f"24 shipped general reference texts; {platform.processor() or platform.machine()}, "
             f"{date.today().isoformat()}. Reproduce: `.venv/bin/python examples/forgetting.py`.", "",
             "| row | trainable params | exact match after | KL(base‖tuned) / token | reference perplexity |",
             "|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| `{r['name']}` | {r['trainable_params']:,} | {r['accuracy_after']:.1%} | {r['kl']:.3g} | "
                     f"{r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Task exact match vs KL to the base, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        ax.scatter(r["kl"], 100 * r["accuracy_after"], s=40)
        ax.annotate(r["name"], (r["kl"], 100 * r["accuracy_after"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=7)
    ax.set_xlabel("KL(base || tuned) per token on general reference text (forgetting)")
    ax.set_ylabel("held-out exact match after training (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Train the rows and write the table, records and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="Training steps per row (default 40).")
    parser.add_argument("--only", type=str, default=None, help=f"Comma-separated rows, of: {', '.join(ROWS)}.")
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "results", help="Where results go.")
    parser.add_argument("--model", type=str, default=None, help="Override the base model (e.g. a tiny test model).")
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="Where the runs write out/<config>/ (default: repo).")
    parser.add_argument("--smoke", action="store_true", help="Two rows, one step, tiny evaluation: a wiring test.")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else (SMOKE_ROWS if args.smoke else list(ROWS))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    steps = 1 if args.smoke else args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    records = [run_row(n, steps, args.out, args.model, args.smoke, args.workdir.resolve()) for n in names]
    (args.out / "forgetting.json").write_text(json.dumps({"steps": steps, "records": records}, indent=2) + "\n")
    (args.out / "forgetting.md").write_text(table(records, steps))
    if not args.smoke:
        plot(records, args.out / "forgetting.png")
    print(table(records, steps))


if __name__ == "__main__":
    main()
