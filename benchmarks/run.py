"""Run the benchmarks: ``python -m benchmarks.run --quick | --full | --smoke [--out DIR] [--only GROUP ...]``.

Writes ``<out>/<mode>.json`` (every repeat's raw timing, plus summaries and goal checks) and ``<out>/<mode>.md``
(the table the README includes). ``--quick`` takes under ~10 minutes on 2 cores; ``--full`` adds SmolLM2-135M
rows and more repeats; ``--smoke`` is a seconds-long check of the harness itself (tiny model, one repeat).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import analysis, goals, report
from benchmarks.imports import measure_imports
from benchmarks.pool import REPO_ROOT, WorkerError, prepare_model, run_group, worker_env
from benchmarks.settings import MODES, Mode
from benchmarks.worker import PROTOCOL_PREFIX

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "lightning", "lightning-lora"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    for name in MODES:
        which.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=f"run the {name} set")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default: 2)")
    parser.add_argument("--only", nargs="+", metavar="GROUP", help="run only these groups (for development)")
    parser.add_argument("--no-imports", action="store_true", help="skip the import-time probes")
    parser.add_argument("--repeats", type=int, help="timed rounds per group (default: the mode's)")
    return parser.parse_args(argv)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem_gib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gib = float("nan")
    return f"{cpu}, {os.cpu_count()} CPU cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, no GPU"


def _cpu() -> dict[str, Any]:
    """The CPU's model name and AVX2 / AVX-512 / AVX512-BF16 / AMX flags, as torch detects them."""
    from lightning_lora.surgery.quant.cpu_precision import cpu_capabilities

    return cpu_capabilities().as_dict()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def _prepare(mode: Mode, tmp: Path, threads: int, notes: list[str]) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for key, spec in mode.models.items():
        request = {"key": key, "source": spec.source, "config": spec.config, "out": str(tmp / key)}
        try:
            models[key] = {"label": spec.label, **prepare_model(request, tmp, threads)}
        except WorkerError as err:
            notes.append(f"{spec.label} rows skipped: the model could not be prepared ({err.args[0].splitlines()[-1]}).")
            print(f"! {spec.label}: skipped\n{err}", file=sys.stderr)
    return models


_MIXED = """
import json
from benchmarks import mixed_batch
rows = mixed_batch.run({quick}, {threads})
print({prefix!r} + json.dumps(rows, default=str))
"""


def _mixed_batch(mode: Mode, threads: int, notes: list[str]) -> list[dict[str, Any]]:
    """``benchmarks.mixed_batch.run(quick)`` (the multi-adapter engineer's rows), in its own process."""
    if not mode.run_mixed_batch:
        return []
    if importlib.util.find_spec("benchmarks.mixed_batch") is None:
        notes.append("mixed-batch rows missing: benchmarks/mixed_batch.py does not exist yet.")
        return []
    print("mixed batch (benchmarks/mixed_batch.py)", file=sys.stderr, flush=True)
    code = _MIXED.format(quick=mode.name != "full", threads=threads, prefix=PROTOCOL_PREFIX)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=worker_env(threads))
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROTOCOL_PREFIX)]
    if proc.returncode != 0 or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        notes.append(f"mixed-batch rows missing: benchmarks/mixed_batch.py failed ({tail}).")
        return []
    return json.loads(found[-1][len(PROTOCOL_PREFIX):])


def run(mode: Mode, out: Path, threads: int, only: list[str] | None = None, imports: bool = True,
        command: str = "") -> dict[str, Any]:
    """Run ``mode`` and write ``<out>/<mode>.json`` and ``.md``; returns the JSON document."""
    start = time.perf_counter()
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lightning-lora-bench-") as tmp:
        models = _prepare(mode, Path(tmp), threads, notes)
        for group in mode.groups:
            if (only and group.name not in only) or group.model not in models:
                continue
            print(f"group {group.name}: {', '.join(w.key for w in group.workers)}", file=sys.stderr, flush=True)
            records += run_group(group, mode, models[group.model]["path"], Path(tmp), threads)
    import_results = measure_imports(mode.import_repeats) if imports and mode.import_repeats and not only else None
    mixed = _mixed_batch(mode, threads, notes) if not only else []
    train = analysis.training_rows(records, threads)
    infer = analysis.inference_rows(records)
    files = analysis.file_rows(records)
    meta = {"mode": mode.name, "command": command or f"python -m benchmarks.run --{mode.name}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(), "cpu": _cpu(), "versions": _versions(), "threads": threads, "batch": list(mode.batch),
            "repeats": mode.repeats, "warmup": mode.warmup, "models": models, "notes": notes,
            "wall_s": time.perf_counter() - start}
    doc = {"meta": meta, "goals": goals.check_goals(train, infer, files, import_results), "training": train,
           "inference": infer, "files": files, "quant": analysis.quant_rows(records), "imports": import_results,
           "mixed_batch": mixed, "raw": records}
    _write(out / f"{mode.name}.json", json.dumps(doc, indent=1, default=str) + "\n")
    _write(out / f"{mode.name}.md", report.render(doc))
    return doc


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    mode = MODES[args.mode]
    if args.repeats:
        mode = dataclasses.replace(mode, repeats=args.repeats, infer_repeats=args.repeats)
    doc = run(mode, args.out, args.threads, args.only, not args.no_imports, command)
    print(f"wrote {args.out / args.mode}.json and .md in {doc['meta']['wall_s']:.0f} s", file=sys.stderr)
    errors = [r for r in doc["raw"] if r["error"]]
    for r in errors:
        print(f"! {r['group']} {r['variant']}/{r['impl']}: {r['error'].splitlines()[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
