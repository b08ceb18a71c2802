"""Parent side: start one group's worker processes and step them in lockstep, alternating their order.

Only one worker computes at a time (the others wait on their stdin), so each one's timing is undisturbed by the
others, while all of them see the same stretch of machine load; the order reverses every round so that no
implementation always runs first (or always runs right after the heaviest configuration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from benchmarks.settings import Group, Mode
from benchmarks.worker import PROTOCOL_PREFIX

REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkerError(RuntimeError):
    """A worker died or answered something unexpected; the message holds the tail of its log."""


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class WorkerProc:
    """One ``python -m benchmarks.worker`` process and its protocol."""

    def __init__(self, args: list[str], log_path: Path, threads: int) -> None:
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, cwd=REPO_ROOT, env=worker_env(threads),
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                return json.loads(line[len(PROTOCOL_PREFIX):])
        self.proc.wait()
        raise WorkerError(f"worker exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}")

    def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as err:
            raise WorkerError(f"worker is gone; log tail:\n{self.log_tail()}") from err
        return self.read()

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


def prepare_model(spec: dict[str, Any], log_dir: Path, threads: int) -> dict[str, Any]:
    """Run the ``--prepare`` step in a subprocess (keeps torch out of the parent)."""
    proc = WorkerProc(["--prepare", json.dumps(spec)], log_dir / f"prepare-{spec['key']}.log", threads)
    try:
        return proc.read()
    finally:
        proc.close()


def run_group(group: Group, mode: Mode, model_dir: str, log_dir: Path, threads: int) -> list[dict[str, Any]]:
    """Start the group's workers, run warm-up and measured rounds, and return one record per worker."""
    records: dict[str, dict[str, Any]] = {}
    procs: dict[str, WorkerProc] = {}
    for worker in group.workers:
        spec = {"impl": worker.impl, "variant": worker.variant, "model_dir": model_dir, "batch": list(mode.batch)}
        log = log_dir / f"{group.name}-{worker.variant}-{worker.impl}.log"
        procs[worker.key] = WorkerProc([json.dumps(spec)], log, threads)
        records[worker.key] = {"group": group.name, "model": group.model, "variant": worker.variant,
                               "impl": worker.impl, "times": {}, "cpu_times": {}, "error": None}
    try:
        live = _await_ready(procs, records)
        _rounds(group, mode, procs, records, live)
        for key in live:
            if records[key]["error"] is None:
                _finish(procs[key], records[key])
    finally:
        for proc in procs.values():
            proc.close()
    return list(records.values())


def _await_ready(procs: dict[str, WorkerProc], records: dict[str, dict[str, Any]]) -> list[str]:
    live = []
    for key, proc in procs.items():
        try:
            ready = proc.read()
        except WorkerError as err:
            records[key]["error"] = f"setup failed: {err}"
            continue
        records[key].update(setup_s=ready["setup_s"], ready_rss_mib=ready["rss_mib"], info=ready["info"],
                            runners=ready["runners"])
        live.append(key)
    return live


def _rounds(group: Group, mode: Mode, procs: dict[str, WorkerProc], records: dict[str, dict[str, Any]],
            live: list[str]) -> None:
    if not live:
        return
    runners = ["step"] if group.kind == "train" else records[live[0]]["runners"]
    repeats = mode.repeats if group.kind == "train" else mode.infer_repeats
    steps = mode.steps_per_repeat if group.kind == "train" else 1
    for rnd in range(mode.warmup + repeats):
        order = live if rnd % 2 == 0 else live[::-1]
        for runner in runners:
            for key in order:
                if records[key]["error"] is not None:
                    continue
                try:
                    reply = procs[key].send({"cmd": "run", "runner": runner, "n": steps})
                except WorkerError as err:
                    records[key]["error"] = f"failed in round {rnd}: {err}"
                    continue
                if rnd >= mode.warmup:
                    for field in ("times", "cpu_times"):
                        records[key][field].setdefault(runner, []).append(sum(reply[field]) / steps)
        _progress(group, rnd, mode.warmup)


def _finish(proc: WorkerProc, record: dict[str, Any]) -> None:
    try:
        final = proc.send({"cmd": "finish"})
    except WorkerError as err:
        record["error"] = f"failed at finish: {err}"
        return
    record.update(metrics=final["metrics"], peak_rss_mib=final["peak_rss_mib"])


def _progress(group: Group, rnd: int, warmup: int) -> None:
    tag = "warm-up" if rnd < warmup else f"repeat {rnd - warmup + 1}"
    print(f"  [{group.name}] {tag} done", file=sys.stderr, flush=True)
