"""Serving benchmark: ``lightning-lora serve`` with many adapters, 16 concurrent clients, greedy, fixed length.

Modes (each client sends one completion request, all at once, ``max_tokens`` new tokens with ``ignore_eos`` so
every answer has the same length; tokens/s = all generated tokens / wall time from the first send to the last
answer; latency = send -> whole answer):

* ``one_adapter``: every request on the same adapter (server, continuous batching);
* ``mixed``: each request on a different adapter (same server);
* ``batching_off``: ``mixed`` on a server started with ``--max_batch_size 1`` (one request at a time);
* ``swapping``: no server: in this process, per request ``set_active_adapters`` then ``generate``, one after the
  other (what serving without per-row adapters does);
* ``short_behind_long``: long requests start, short ones (1/8 the tokens) arrive ``--short_delay`` s later on the
  batching server; their latency is compared with a short request alone (``short_alone``).

Usage::

    python -m benchmarks.serve                   # SmolLM2-135M-Instruct, 16 clients x 64 tokens, 16 adapters
    python -m benchmarks.serve --smoke           # tiny random model, 4 clients x 8 tokens: checks the harness

Writes ``benchmarks/results/serve.json`` and ``serve.md`` (``--out DIR`` elsewhere; smoke: ``serve_smoke.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
GOALS = {"mixed / one_adapter tokens/s >= 0.9": 0.9, "mixed / batching_off tokens/s >= 3": 3.0,
         "mixed / swapping tokens/s > 1": 1.0, "short_behind_long p50 / long p50 <= 0.5": 0.5}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny random model, 4 clients x 8 tokens.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Base model (alias or directory).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16, help="Adapters (all-linear, r=16, random B).")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the model process.")
    parser.add_argument("--short_delay", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.new_tokens, args.adapters, args.short_delay, args.threads = 4, 8, 4, 0.2, 1
    return args


# ---------------------------------------------------------------------------------------------------- set-up
def prepare(args: argparse.Namespace, tmp: Path) -> tuple[str, dict[str, str]]:
    """The base model directory and ``args.adapters`` saved adapters (random, non-zero B: they differ)."""
    from lightning_lora import LoRAConfig, apply_lora, save_adapter
    from lightning_lora.modules.loading import load_causal_lm

    model_dir = args.model
    if args.smoke:
        sys.path.insert(0, str(REPO))
        from tests.tiny_lm import (
            save_tiny_causal_lm,  # the harness check needs no download
        )

        model_dir = str(save_tiny_causal_lm(tmp / "model"))
    model, _ = load_causal_lm(model_dir)
    paths = {}
    for i in range(args.adapters):
        name = f"ad{i}"
        apply_lora(model, LoRAConfig(r=16, alpha=32, targets="all-linear"), name=name)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}" in pname:
                    param.normal_(0.0, 0.02, generator=generator)
        paths[name] = str(save_adapter(model, tmp / "adapters" / name, name=name))
    return model_dir, paths


def start_server(model_dir: str, adapters: dict[str, str], max_batch_size: int, threads: int,
                 log: Path) -> tuple[subprocess.Popen, str]:
    """Start ``lightning-lora serve`` on a free port (returns at once; see :func:`wait_healthy`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "lightning_lora.cli", "serve", "--model", model_dir, "--port", str(port),
           "--max_batch_size", str(max_batch_size), "--log_level", "warning",
           "--adapters", *[f"{n}={p}" for n, p in adapters.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- running
def prompts(n: int) -> list[str]:
    topics = ["the sea", "a city at night", "bread", "mountains", "a robot", "rain", "chess", "a library"]
    return [f"Write a few sentences about {topics[i % len(topics)]} (request {i})." for i in range(n)]


def run_clients(url: str, jobs: list[tuple[str, str, int, float]]) -> tuple[list[dict], float]:
    """Send ``(model, prompt, max_tokens, delay_s)`` jobs concurrently; returns per-request records and wall time."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1800)
    t0 = time.perf_counter()

    def one(job: tuple[str, str, int, float]) -> dict:
        model, prompt, n, delay = job
        time.sleep(max(0.0, t0 + delay - time.perf_counter()))
        start = time.perf_counter()
        got = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"ignore_eos": True})
        return {"model": model, "latency_s": time.perf_counter() - start, "tokens": got.usage.completion_tokens,
                "short": n < max(j[2] for j in jobs)}

    with ThreadPoolExecutor(len(jobs)) as pool:
        records = list(pool.map(one, jobs))
    return records, time.perf_counter() - t0


def swapping(model_dir: str, adapters: dict[str, str], jobs: list[tuple[str, str, int, float]],
             threads: int) -> tuple[list[dict], float]:
    """No server: per request, activate its adapter and ``generate``; all requests arrived at time 0."""
    from lightning_lora import load_adapter, set_active_adapters
    from lightning_lora.modules.loading import load_causal_lm

    torch.set_num_threads(threads)
    model, tok = load_causal_lm(model_dir)
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    model.eval()
    records, t0 = [], time.perf_counter()
    for name, prompt, n, _ in jobs:
        set_active_adapters(model, name)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        records.append({"model": name, "latency_s": time.perf_counter() - t0, "tokens": out.shape[1] - ids.shape[1],
                        "short": False})
    return records, time.perf_counter() - t0


def summary(records: list[dict], wall: float, **extra: Any) -> dict[str, Any]:
    lat = sorted(r["latency_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    return {"requests": len(records), "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(lat), 3), "p95_s": round(p95, 3), **extra}


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model_dir, adapters = prepare(args, tmp)
    names, texts, n = list(adapters), prompts(args.clients), args.new_tokens
    one = [(names[0], texts[i], n, 0.0) for i in range(args.clients)]
    mixed = [(names[i % len(names)], texts[i], n, 0.0) for i in range(args.clients)]
    short_n = max(1, n // 8)
    n_short = max(1, args.clients // 4)
    behind = mixed[: args.clients - n_short] + [(names[i % len(names)], texts[i], short_n, args.short_delay)
                                                 for i in range(n_short)]
    modes: dict[str, Any] = {}
    # Both servers start together (start-up is most of a smoke run); the idle one waits on its queue meanwhile.
    proc, url = start_server(model_dir, adapters, args.clients, args.threads, tmp / "server.log")
    off, off_url = start_server(model_dir, adapters, 1, args.threads, tmp / "server_off.log")
    try:
        wait_healthy(proc, url, tmp / "server.log")
        wait_healthy(off, off_url, tmp / "server_off.log")
        run_clients(url, mixed[:2])  # warm-up (stacks every layer's adapters once)
        modes["one_adapter"] = summary(*run_clients(url, one))
        modes["mixed"] = summary(*run_clients(url, mixed))
        modes["short_alone"] = summary(*run_clients(url, [(names[0], texts[0], short_n, 0.0)]))
        records, wall = run_clients(url, behind)
        modes["short_behind_long"] = summary([r for r in records if r["short"]], wall,
                                             long_p50_s=round(statistics.median(r["latency_s"] for r in records
                                                                                if not r["short"]), 3))
        stop_server(proc)
        run_clients(off_url, mixed[:1])
        modes["batching_off"] = summary(*run_clients(off_url, mixed))
    finally:
        stop_server(proc)
        stop_server(off)
    modes["swapping"] = summary(*swapping(model_dir, adapters, mixed, args.threads))
    return modes


def goals(modes: dict[str, Any]) -> list[dict[str, Any]]:
    tps = {k: v["tokens_per_s"] for k, v in modes.items()}
    values = [tps["mixed"] / tps["one_adapter"], tps["mixed"] / tps["batching_off"], tps["mixed"] / tps["swapping"],
              modes["short_behind_long"]["p50_s"] / modes["short_behind_long"]["long_p50_s"]]
    out = []
    for (goal, bound), value in zip(GOALS.items(), values):
        met = value <= bound if goal.startswith("short") else value >= bound if ">=" in goal else value > bound
        out.append({"goal": goal, "value": round(value, 3), "met": bool(met)})
    return out


def render(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    setting = (f"`{meta['command']}`: {meta['model']}, {meta['clients']} clients x {meta['new_tokens']} new tokens "
               f"(greedy, ignore_eos), {meta['adapters']} adapters (all-linear r16), {meta['threads']} threads; "
               f"{meta['machine']}. {meta['date']}.")
    lines = [f"# Serving benchmark{' (smoke)' if meta['smoke'] else ''}", "", setting, "",
             "| mode | requests | tokens/s | p50 latency (s) | p95 latency (s) |", "|---|---|---|---|---|"]
    for name, m in doc["modes"].items():
        lines.append(f"| {name} | {m['requests']} | {m['tokens_per_s']} | {m['p50_s']} | {m['p95_s']} |")
    behind = doc["modes"]["short_behind_long"]
    note = (f"`short_behind_long`: {behind['requests']} short requests ({doc['meta']['new_tokens'] // 8 or 1} "
            f"tokens) sent while long ones run: p50 {behind['p50_s']} s, against {behind['long_p50_s']} s for the "
            f"long requests and {doc['modes']['short_alone']['p50_s']} s for a short request alone.")
    lines += ["", note,
              "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in doc["goals"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from benchmarks.run import _machine

    with tempfile.TemporaryDirectory() as tmp:
        modes = run(args, Path(tmp))
    command = "python -m benchmarks.serve" + (" --smoke" if args.smoke else "")
    doc = {"meta": {"command": command, "smoke": args.smoke, "model": "tiny random Llama" if args.smoke else args.model,
                    "clients": args.clients, "new_tokens": args.new_tokens, "adapters": args.adapters,
                    "threads": args.threads, "machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())},
           "modes": modes, "goals": goals(modes)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serve_smoke" if args.smoke else "serve"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(render(doc))
    sys.stdout.write(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
