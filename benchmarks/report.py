"""Render a run's results (the JSON document) as the markdown page that the README includes."""

from __future__ import annotations

import math
from typing import Any


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _med(s: dict[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    """``median [min-max]`` of a summary (optionally scaled, e.g. to ms)."""
    if not s or not s.get("n"):
        return "—"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _value(goal: dict[str, Any]) -> str:
    v, fmt = goal["value"], goal["fmt"]
    if v is None:
        return "not measured"
    if fmt == "pct":
        return f"{v:+.1%}"
    if fmt == "s":
        return f"{v:.3f} s"
    return str(v) if fmt == "str" else f"{v:.3f}"


def _met(goal: dict[str, Any]) -> str:
    if goal["met"] is None:
        return "—" if goal["value"] is not None else "n/a"
    if goal["met"]:
        return "yes"
    return "no (within noise)" if goal["within_noise"] else "**no**"


def goals_section(goals: list[dict[str, Any]]) -> list[str]:
    rows = [[g["goal"], g["target"], _value(g), g["spread"] or "", _met(g)] for g in goals]
    # Only what this run measured: no explanations written in advance (a goal not met shows its spread and the
    # CPU share of its rounds, which say whether the machine was busy).
    return ["## Goals", "", *_table(["goal", "target", "measured (median)", "spread", "met"], rows)]


def training_section(rows: list[dict[str, Any]], models: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        info = models.get(model, {})
        lines += ["", f"## Training step: {info.get('label', model)} ({_params(info)})", ""]
        table = []
        for r in (x for x in rows if x["model"] == model):
            peft = r.get("vs_peft_step")
            full = _med(r["vs_full"]) + ("" if r["vs_full_paired"] or not r["vs_full"] else " ‡")
            table.append([
                r["label"], r["impl"], _med(r["step_s"]), full, _med(r["vs_floor"]),
                _med(peft) if peft else "", _med(r.get("vs_peft_cpu")) if peft else "", _num(r["cpu_share"]["median"], 2),
                _num(r["peak_rss_mib"], 0), _num(_inc(r), 0),
                _num(r.get("vs_peft_rss")) if peft else "", f"{r['trainable']:,}" if r["trainable"] is not None else "—",
                _num(r["first_loss"], 4), r["rounds"], f"error: {r['error'].splitlines()[0]}" if r["error"] else "",
            ])
        lines += _table(["config", "impl", "step s median [min-max]", "vs full FT", "vs floor",
                         "ours/PEFT step (paired)", "ours/PEFT CPU time", "CPU share", "peak RSS MiB",
                         "RSS growth in training MiB", "ours/PEFT peak RSS", "trainable", "first loss", "clean rounds",
                         "note"], table)
    lines += ["", "CPU share: the worker's CPU time / (wall time x threads), median; near 1 means it had its cores to "
              "itself, well below 1 means other processes took them. A round is clean when every step in it had a "
              "share >= 0.85; statistics use the clean rounds when there are at least 3 (else all rounds)."]
    if any(r["vs_full"] and not r["vs_full_paired"] for r in rows):
        lines += ["", "‡ ratio of medians across groups (measured in a different time window), not paired by round."]
    return lines


def _inc(r: dict[str, Any]) -> float | None:
    return None if r["peak_rss_mib"] is None or r["ready_rss_mib"] is None else r["peak_rss_mib"] - r["ready_rss_mib"]


def _params(info: dict[str, Any]) -> str:
    return f"{info['params']:,} params" if info.get("params") else "not built"


def inference_section(rows: list[dict[str, Any]], models: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += ["", f"## Inference, surgery and merge: {models.get(model, {}).get('label', model)}", ""]
        table = []
        for r in (x for x in rows if x["model"] == model):
            ms = r["runner"].startswith(("surgery", "merge_"))
            scale, digits = (1000.0, 1) if ms else (1.0, 3)
            table.append([_runner_label(r["runner"]), _med(r["ours_s"], digits, scale),
                          _med(r["peft_s"], digits, scale), _med(r["ours_vs_peft"]),
                          _med(r.get("ours_vs_base")), _med(r.get("peft_vs_base"))])
        lines += _table(["measure", "ours", "PEFT", "ours/PEFT (paired)", "ours vs base", "PEFT vs base"], table)
    return lines


_TARGETS = {"qv": "q,v", "all": "all-linear"}


def _runner_label(runner: str) -> str:
    kind, _, rest = runner.partition("_")
    tag, _, extra = rest.partition("_")
    what = _TARGETS.get(tag, tag)
    if kind == "base":
        return "forward, base model (s)"
    if kind in ("unmerged", "merged"):
        return f"forward, {kind} {what} adapter (s)"
    if kind == "surgery":
        return f"apply_lora / get_peft_model, {what} (ms)"
    check = "no finiteness check in either" if extra == "unchecked" else "defaults: ours checks finiteness, PEFT not"
    return f"merge_lora / merge_and_unload, {what}, {check} (ms)"


def files_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    table = [[r["model"], r["targets"], r["impl"], f"{r['weights_file_bytes']:,}", f"{r['raw_param_bytes']:,}",
              f"{r['overhead']:+.3%}", f"{r['config_file_bytes']:,}"] for r in rows]
    return ["", "## Adapter files (r=16, fp32)", "",
            *_table(["model", "targets", "impl", "adapter_model.safetensors bytes", "raw parameter bytes",
                     "overhead", "adapter_config.json bytes"], table)]


def quant_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    table = [[r["model"], r["impl"], str(r["layers"]), f"{r['bytes_4bit']:,}", f"{r['bytes_bf16']:,}",
              f"{r['bytes_fp32']:,}", f"{r['vs_bf16']:.3f}", f"{r['vs_fp32']:.3f}"] for r in rows]
    return ["", "## 4-bit weight memory (NF4 + double quantization, every Linear but lm_head)", "",
            *_table(["model", "impl", "layers", "4-bit bytes (data + state)", "bf16 bytes", "fp32 bytes", "vs bf16",
                     "vs fp32"], table)]


def imports_section(imports: dict[str, Any] | None) -> list[str]:
    if not imports:
        return []
    rows = [["`import lightning_lora` (fresh interpreter)", _med(imports["lightning_lora_s"])],
            ["`import lightning` (fresh interpreter)", _med(imports["lightning_s"])],
            ["`import lightning_lora` right after `import lightning`", _med(imports["increment_after_lightning_s"])],
            ["heavy modules imported by `import lightning_lora`", ", ".join(imports["heavy_modules_imported"]) or "none"]]
    return ["", "## Import time (s, median [min-max])", "", *_table(["measure", "value"], rows)]


def extra_section(title: str, rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    header = list(dict.fromkeys(k for r in rows for k in r))
    body = [[_cell(r.get(k)) for k in header] for r in rows]
    return ["", f"## {title}", "", *_table(header, body)]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "median" in v:
        return _med(v)
    return "" if v is None else str(v)


def cpu_line(cpu: dict[str, Any]) -> str:
    """``AMD EPYC: AVX2 yes, AVX-512 yes, AVX512-BF16 yes, AMX no (torch: AVX512)``."""
    flags = [("AVX2", "avx2"), ("AVX-512", "avx512"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")]
    found = ", ".join(f"{label} {'yes' if cpu.get(key) else 'no'}" for label, key in flags)
    return f"{cpu.get('model_name', '?')}: {found} (torch: {cpu.get('torch_capability', '?')})"


def render(doc: dict[str, Any]) -> str:
    """The whole page."""
    meta = doc["meta"]
    lines = [f"# Benchmarks: lightning-lora vs PEFT ({meta['mode']})", "",
             f"Command: `{meta['command']}` — run {meta['date']}, wall time {meta['wall_s']:.0f} s.  ",
             f"Machine: {meta['machine']}.  ",
             *([f"CPU capabilities: {cpu_line(meta['cpu'])}.  "] if meta.get("cpu") else []),
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".  ",
             f"Setup: fp32, {meta['threads']} threads, batch {meta['batch'][0]}x{meta['batch'][1]}, LoRA r=16 "
             f"alpha=32 dropout=0; {meta['repeats']} repeats after {meta['warmup']} warm-up round(s); each "
             "configuration in its own process, ours and PEFT stepped in lockstep with alternating order. "
             "Ratios are medians of per-round paired ratios [min-max].", ""]
    lines += goals_section(doc["goals"])
    lines += training_section(doc["training"], meta["models"])
    lines += inference_section(doc["inference"], meta["models"])
    lines += files_section(doc["files"]) + quant_section(doc["quant"]) + imports_section(doc["imports"])
    lines += extra_section("Mixed-batch adapters (benchmarks/mixed_batch.py)", doc.get("mixed_batch") or [])
    for note in meta.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
