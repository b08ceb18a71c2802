"""A worker process: builds one configuration, then runs timed steps when the parent asks.

Protocol (one JSON object per line): the worker prints ``{"ready": ...}`` once built; the parent writes
``{"cmd": "run", "runner": NAME, "n": N}`` and gets ``{"times": [...]}``; ``{"cmd": "finish"}`` returns the
metrics and the process's peak RSS, and the worker exits. Protocol lines go to the original stdout; anything the
libraries print is sent to stderr, so it cannot corrupt the protocol.

Usage: ``python -m benchmarks.worker '<json spec>'`` or ``python -m benchmarks.worker --prepare '<json spec>'``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

PROTOCOL_PREFIX = "@@BENCH "


def rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``fn()``.

    CPU time is the secondary figure: on a shared machine it leaves out the time our threads waited for a core,
    though it counts the spinning of a thread waiting for a descheduled peer.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class Bench:
    """A built configuration: named runners (each returns the wall and CPU seconds it measured) and metrics."""

    def __init__(self) -> None:
        self.runners: dict[str, Callable[[], tuple[float, float]]] = {}
        self.info: dict[str, Any] = {}

    def metrics(self) -> dict[str, Any]:
        return {}


def _inputs(model: Any, batch: list[int]) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, model.config.vocab_size, tuple(batch), generator=gen)  # (B, T)


class TrainBench(Bench):
    """One training configuration; its runner is a full step: zero_grad, forward, backward, AdamW step."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        import torch

        from benchmarks import setups
        from benchmarks.settings import VARIANTS

        targets, checkpointing, four_bit = VARIANTS[spec["variant"]]
        impl = spec["impl"]
        model = setups.load_base_4bit(spec["model_dir"], impl) if four_bit else setups.load_base(spec["model_dir"])
        self.quant = setups.quantized_weight_bytes(model) if four_bit else None
        if checkpointing:
            setups.enable_checkpointing(model)
        if spec["variant"] == "floor":
            model = setups.make_floor(model)
        elif targets is not None:
            model = setups.add_lora(model, impl, targets)
        model.train()
        params = setups.trainable(model)
        self.model, self.ids = model, _inputs(model, spec["batch"])
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.losses: list[float] = []
        self.info = {"trainable": sum(p.numel() for p in params),
                     "total": sum(p.numel() for p in model.parameters())}
        self.runners["step"] = lambda: timed(self._step)

    def _step(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        self.losses.append(loss.item())

    def metrics(self) -> dict[str, Any]:
        return {"first_loss": self.losses[0] if self.losses else None, "quant": self.quant}


class InferBench(Bench):
    """Inference latency (base / unmerged / merged adapter), surgery and merge times, adapter file sizes."""

    TARGETS: dict[str, list[str] | str] = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        from benchmarks import setups

        self.impl, self.setups = spec["impl"], setups
        base = setups.load_base(spec["model_dir"]).eval()
        self.base, self.ids = base, _inputs(base, spec["batch"])
        self.unmerged: dict[str, Any] = {}
        self.runners["base"] = lambda: self._forward(self.base)
        for tag, targets in self.TARGETS.items():
            unmerged = self._adapted(targets)
            merged = setups.merge(setups.deepcopy(unmerged), self.impl).eval()
            self.unmerged[tag] = unmerged
            self.runners[f"unmerged_{tag}"] = lambda m=unmerged: self._forward(m)
            self.runners[f"merged_{tag}"] = lambda m=merged: self._forward(m)
            self.runners[f"surgery_{tag}"] = lambda t=targets: self._time_surgery(t)
            self.runners[f"merge_{tag}"] = lambda t=targets: self._time_merge(t, None)
            self.runners[f"merge_{tag}_unchecked"] = lambda t=targets: self._time_merge(t, False)

    def _adapted(self, targets: list[str] | str) -> Any:
        model = self.setups.add_lora(self.setups.deepcopy(self.base), self.impl, targets)
        self.setups.perturb_b(model)
        return model.eval()

    def _forward(self, model: Any) -> tuple[float, float]:
        import torch

        with torch.no_grad():
            return timed(lambda: model(input_ids=self.ids))

    def _time_surgery(self, targets: list[str] | str) -> tuple[float, float]:
        fresh = self.setups.deepcopy(self.base)
        return timed(lambda: self.setups.add_lora(fresh, self.impl, targets))

    def _time_merge(self, targets: list[str] | str, checked: bool | None) -> tuple[float, float]:
        model = self._adapted(targets)
        return timed(lambda: self.setups.merge(model, self.impl, checked))

    def metrics(self) -> dict[str, Any]:
        files = {}
        with tempfile.TemporaryDirectory() as tmp:
            for tag, model in self.unmerged.items():
                out = Path(tmp) / tag
                self.setups.save(model, self.impl, out)
                raw = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
                files[tag] = {"weights_file_bytes": (out / "adapter_model.safetensors").stat().st_size,
                              "config_file_bytes": (out / "adapter_config.json").stat().st_size,
                              "raw_param_bytes": raw}
        return {"adapter_files": files}


def _serve(bench: Bench, setup_s: float, proto: TextIO) -> None:
    def send(obj: dict[str, Any]) -> None:
        proto.write(PROTOCOL_PREFIX + json.dumps(obj) + "\n")
        proto.flush()

    send({"ready": True, "setup_s": setup_s, "rss_mib": rss_mib(), "info": bench.info,
          "runners": sorted(bench.runners)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            results = [bench.runners[cmd["runner"]]() for _ in range(cmd["n"])]
            send({"times": [wall for wall, _ in results], "cpu_times": [cpu for _, cpu in results]})
        elif cmd["cmd"] == "finish":
            send({"metrics": bench.metrics(), "peak_rss_mib": peak_rss_mib()})
            return


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Save the seeded random model into ``spec["out"]`` (or find SmolLM2's cached dir) and describe it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec["source"] == "smollm2":
        from lightning_lora.modules.smollm2 import smollm2_dir

        path = str(smollm2_dir())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**spec["config"]))
        model.save_pretrained(spec["out"])
        path = spec["out"]
    cfg = model.config
    return {"path": path, "params": sum(p.numel() for p in model.parameters()),
            "config": {k: getattr(cfg, k, None) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "intermediate_size", "vocab_size",
                                                         "tie_word_embeddings")}}


def main(argv: list[str]) -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints (Python or C) go to stderr from here on
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if argv[0] == "--prepare":
        proto.write(PROTOCOL_PREFIX + json.dumps(prepare(json.loads(argv[1]))) + "\n")
        proto.flush()
        return
    spec = json.loads(argv[0])
    start = time.perf_counter()
    bench = InferBench(spec) if spec["variant"] == "infer" else TrainBench(spec)
    _serve(bench, time.perf_counter() - start, proto)


if __name__ == "__main__":
    main(sys.argv[1:])
