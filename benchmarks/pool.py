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
                               "impl": worker.impl, "times": {}, "cpu_times": {}, "round_clean": [], "error": None}
    try:
        live = _await_ready(procs, records)
        _rounds(group, mode, procs, records, live, threads)
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


# A round counts as clean when every timed forward/step in it kept its threads busy this share of the wall time
# (about 0.99 on an idle machine; 0.3-0.5 when other processes hold the cores).
CLEAN_CPU_SHARE = 0.85


def _rounds(group: Group, mode: Mode, procs: dict[str, WorkerProc], records: dict[str, dict[str, Any]],
            live: list[str], threads: int) -> None:
    """Warm-up, then ``repeats`` timed rounds, plus up to ``extra_rounds`` more while some but too few were clean.

    Every round is kept in the record (``round_clean`` says which were clean); the analysis uses the clean ones
    when there are enough. Rounds are whole units for every worker, so pairs stay paired. Extra rounds are only
    worth their time when the machine is quiet part of the time: under sustained load none would be clean.
    """
    if not live:
        return
    runners = ["step"] if group.kind == "train" else records[live[0]]["runners"]
    repeats = mode.repeats if group.kind == "train" else mode.infer_repeats
    clean = rnd = 0
    while rnd < mode.warmup + repeats or (0 < clean < repeats and rnd < mode.warmup + repeats + mode.extra_rounds):
        shares = _round(rnd, runners, live, procs, records, mode, group.kind)
        share = min(shares, default=1.0) / threads
        if rnd >= mode.warmup:
            is_clean = share >= CLEAN_CPU_SHARE
            clean += is_clean
            for key in live:
                records[key]["round_clean"].append(is_clean)
        _progress(group, rnd, mode.warmup, share)
        rnd += 1


def _round(rnd: int, runners: list[str], live: list[str], procs: dict[str, WorkerProc],
           records: dict[str, dict[str, Any]], mode: Mode, kind: str) -> list[float]:
    """One step of every runner in every worker (order reversed on odd rounds); returns the CPU/wall shares."""
    steps = mode.steps_per_repeat if kind == "train" else 1
    order = live if rnd % 2 == 0 else live[::-1]
    shares = []
    for runner in runners:
        for key in order:
            if records[key]["error"] is not None:
                continue
            try:
                reply = procs[key].send({"cmd": "run", "runner": runner, "n": steps})
            except WorkerError as err:
                records[key]["error"] = f"failed in round {rnd}: {err}"
                continue
            wall, cpu = sum(reply["times"]) / steps, sum(reply["cpu_times"]) / steps
            if runner == "step" or "merged" in runner or runner == "base":  # multi-threaded work only
                shares.append(cpu / wall if wall > 0 else 0.0)
            if rnd >= mode.warmup:
                records[key]["times"].setdefault(runner, []).append(wall)
                records[key]["cpu_times"].setdefault(runner, []).append(cpu)
    return shares


def _finish(proc: WorkerProc, record: dict[str, Any]) -> None:
    try:
        final = proc.send({"cmd": "finish"})
    except WorkerError as err:
        record["error"] = f"failed at finish: {err}"
        return
    record.update(metrics=final["metrics"], peak_rss_mib=final["peak_rss_mib"])


def _progress(group: Group, rnd: int, warmup: int, share: float) -> None:
    tag = "warm-up" if rnd < warmup else f"round {rnd - warmup + 1}"
    busy = "" if share >= CLEAN_CPU_SHARE else " (machine busy: round marked not clean)"
    print(f"  [{group.name}] {tag} done, CPU share {share:.2f}{busy}", file=sys.stderr, flush=True)
