"""End to end: the demo task trained two ways, ``lightning-lora fit`` and PEFT + transformers' ``Trainer``.

Same model (SmolLM2-135M-Instruct), data (``examples/data/dates``), LoRA (r 16, alpha 32, dropout 0, all-linear)
and hyperparameters (AdamW lr 5e-4, batch 8, constant lr, seed 0). Each side runs in its own process, one after
the other, and evaluates held-out exact match every ``--eval-every`` steps with the same function
(:mod:`benchmarks.e2e_eval`), stopping at ``--target``. Measured: time to the target (from process start, so imports
and model loading count; evaluation time taken out), steps to the target, peak RSS, final accuracy. Each side uses
what its user gets by default: ours ``examples/demo.yaml`` as shipped (``dtype: auto``, ``packing: true``), PEFT's
script fp32 with padded batches (``--peft-bf16`` gives it ``TrainingArguments(bf16=True)``).

    python -m benchmarks.e2e            # writes benchmarks/results/e2e.{json,md}; minutes on 2 cores
    python -m benchmarks.e2e --smoke    # tiny random model, 4 steps: checks the harness, measures nothing useful
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e_eval import T0_ENV

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
VAL = "examples/data/dates/val.jsonl"
GOAL = 0.8  # ours / PEFT+Trainer time to the target, from the issue


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, 4 steps (a harness check)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--max-steps", type=int, help="step budget per side (default: 150; smoke: 4)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: 10; smoke: 2)")
    p.add_argument("--target", type=float, default=0.9, help="held-out exact match that ends the race")
    p.add_argument("--peft-bf16", action="store_true", help="run the PEFT side with TrainingArguments(bf16=True)")
    return p.parse_args(argv)


def _model_dir(smoke: bool, tmp: Path) -> str:
    if smoke:
        from tests.tiny_lm import save_tiny_causal_lm

        return str(save_tiny_causal_lm(tmp / "tiny"))
    from lightning_lora.modules.loading import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")  # converted once from the bundled GGUF, then cached


def _run(cmd: list[str], label: str) -> float:
    env = {**os.environ, T0_ENV: repr(time.time())}
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{label} failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.time() - start


def _ours_cmd(args: argparse.Namespace, model: str, tmp: Path, eval_samples: int | None, new_tokens: int) -> list[str]:
    callback = {"class_path": "benchmarks.e2e_lightning.TimeToAccuracy",
                "init_args": {"out": str(tmp / "ours.json"), "val_file": VAL, "every_n_steps": args.eval_every,
                              "target": args.target, "max_eval_samples": eval_samples, "max_new_tokens": new_tokens}}
    overrides = {"model": {"model": model, "max_new_tokens": new_tokens},
                 "trainer": {"max_steps": args.max_steps, "logger": False, "enable_checkpointing": False,
                             "enable_progress_bar": False, "default_root_dir": str(tmp / "runs"),
                             "callbacks": [callback]}}  # fmt: skip
    (tmp / "ours.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    return [sys.executable, "-m", "lightning_lora.cli", "fit", "--config", "examples/demo.yaml",
            "--config", str(tmp / "ours.yaml")]


def _peft_cmd(args: argparse.Namespace, model: str, tmp: Path, eval_samples: int | None, new_tokens: int) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.e2e_peft", "--model", model, "--out", str(tmp / "peft.json"),
           "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every), "--target", str(args.target),
           "--max-new-tokens", str(new_tokens), *(["--max-eval-samples", str(eval_samples)] if eval_samples else [])]
    return cmd + (["--bf16"] if args.peft_bf16 else [])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both sides and return the results document."""
    from lightning_lora.surgery.quant.cpu_precision import cpu_capabilities

    args.max_steps = args.max_steps or (4 if args.smoke else 150)
    args.eval_every = args.eval_every or (2 if args.smoke else 10)
    eval_samples, new_tokens = (4, 4) if args.smoke else (None, 12)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = _model_dir(args.smoke, tmp)
        sides = {}
        for side, build in (("ours", _ours_cmd), ("peft_trainer", _peft_cmd)):
            wall = _run(build(args, model, tmp, eval_samples, new_tokens), side)
            sides[side] = {**json.loads((tmp / f"{'ours' if side == 'ours' else 'peft'}.json").read_text()),
                           "process_wall_s": wall}
    ours, peft = sides["ours"]["to_target_s"], sides["peft_trainer"]["to_target_s"]
    import peft as peft_pkg
    import torch
    import transformers

    return {
        "meta": {"command": "python -m benchmarks.e2e" + (" --smoke" if args.smoke else "")
                 + (" --peft-bf16" if args.peft_bf16 else ""),
                 "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "cpu": cpu_capabilities().as_dict(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_average_1m": os.getloadavg()[0],
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft_pkg.__version__},
                 "settings": {"max_steps": args.max_steps, "eval_every": args.eval_every, "target": args.target,
                              "smoke": args.smoke, "model": "tiny random Llama" if args.smoke else "SmolLM2-135M-Instruct"},
                 "wall_s": time.time() - start},
        "sides": sides,
        "goal": {"name": "time to target ours / PEFT+Trainer", "target": f"<= {GOAL}",
                 "value": None if ours is None or peft is None else ours / peft,
                 "met": None if ours is None or peft is None else ours / peft <= GOAL},
    }  # fmt: skip


def _fmt(x: float | None, digits: int = 1) -> str:
    return "not reached" if x is None else f"{x:.{digits}f}"


def render(doc: dict[str, Any]) -> str:
    """The markdown page."""
    meta, cpu = doc["meta"], doc["meta"]["cpu"]
    flags = ", ".join(f"{k} {'yes' if cpu[key] else 'no'}" for k, key in
                      (("AVX2", "avx2"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")))  # fmt: skip
    lines = [f"# End to end: lightning-lora fit vs PEFT + transformers Trainer{' (smoke)' if meta['settings']['smoke'] else ''}",
             "", f"Command: `{meta['command']}` — run {meta['date']}, {meta['wall_s']:.0f} s.  ",
             f"CPU: {cpu['model_name']} ({flags}), {meta['cpu_cores']} cores, 1-minute load average at the end "
             f"{meta['load_average_1m']:.1f}.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".  ",
             f"Task: {meta['settings']['model']}, dates -> ISO, LoRA r16 all-linear, AdamW 5e-4, batch 8; held-out exact "
             f"match every {meta['settings']['eval_every']} steps, target {meta['settings']['target']:.0%}, at most "
             f"{meta['settings']['max_steps']} steps.", "",
             "| side | precision | time to target s | steps to target | final accuracy | peak RSS MiB | process wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, s in doc["sides"].items():
        precision = s.get("precision", "") + (", packed batches" if s.get("packing") else "")
        lines.append(f"| {name} | {precision} | {_fmt(s['to_target_s'])} | {s['steps_to_target'] or 'not reached'} | "
                     f"{_fmt(s['final_accuracy'], 3)} | {s['peak_rss_mib']:.0f} | {s['process_wall_s']:.1f} |")
    goal = doc["goal"]
    met = {None: "n/a", True: "yes", False: "**no**"}[goal["met"]]
    lines += ["", f"Goal: {goal['name']} {goal['target']}: measured {_fmt(goal['value'], 3)}, met: {met}.", "",
              "Time to target: from process start (imports and model loading count) to the first evaluation at or "
              "above the target, with the time spent evaluating taken out (both sides run the same evaluation)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    doc = run(args)
    name = "e2e_smoke" if args.smoke else "e2e"
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(doc, indent=1) + "\n"), ("md", render(doc))):
        target = args.out / f"{name}.{suffix}"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)  # atomic: a reader never sees half a file
    print(f"wrote {args.out / name}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
