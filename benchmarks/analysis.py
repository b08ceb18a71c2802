"""Turn the workers' raw records into result rows, ours/PEFT comparisons and goal checks (plain dicts for JSON)."""

from __future__ import annotations

from typing import Any

from benchmarks.settings import VARIANT_LABELS
from benchmarks.stats import paired_ratios, summary

MIN_CLEAN_ROUNDS = 3


def kept_rounds(record: dict[str, Any]) -> list[int] | None:
    """Indices of the clean rounds when there are at least ``MIN_CLEAN_ROUNDS`` (or all rounds are clean), else
    None: then every round is used, and the tables show how few were clean."""
    mask = record.get("round_clean", [])
    clean = [i for i, ok in enumerate(mask) if ok]
    return clean if clean and len(clean) >= min(MIN_CLEAN_ROUNDS, len(mask)) else None


def _times(record: dict[str, Any] | None, runner: str, field: str = "times") -> list[float]:
    """Per-round wall seconds (``field="times"``) or process CPU seconds (``"cpu_times"``) of one runner, from the
    clean rounds when there are enough of them (the same rounds for every worker of a group, so pairs stay paired)."""
    if record is None:
        return []
    values = record.get(field, {}).get(runner, [])
    kept = kept_rounds(record)
    return values if kept is None else [values[i] for i in kept if i < len(values)]


def rounds_note(record: dict[str, Any]) -> str:
    """``"clean/all"`` rounds of a worker, e.g. ``"5/6"``."""
    mask = record.get("round_clean", [])
    return f"{sum(mask)}/{len(mask)}"


def _find(records: list[dict[str, Any]], model: str, variant: str, impl: str) -> dict[str, Any] | None:
    for r in records:
        if r["model"] == model and r["variant"] == variant and r["impl"] == impl:
            return r
    return None


def training_rows(records: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """One row per training worker, with its step summary, memory and its ratios to full FT, the floor and PEFT.

    ``cpu_share`` is the process CPU time over ``wall * threads``: about 1 when the worker had its cores to itself
    for the whole step, well below 1 when other processes took them (its timings then mean little).
    """
    rows = []
    for rec in records:
        if rec["variant"] == "infer":
            continue
        model, variant, impl = rec["model"], rec["variant"], rec["impl"]
        steps = _times(rec, "step")
        full, floor = _find(records, model, "full", "none"), _find(records, model, "floor", "none")
        peft = _find(records, model, variant, "peft") if impl == "ours" else None
        same_group = full is not None and full["group"] == rec["group"]
        row = {
            "model": model, "group": rec["group"], "rounds": rounds_note(rec), "variant": variant,
            "label": VARIANT_LABELS[variant], "impl": impl,
            "step_s": summary(steps), "step_cpu_s": summary(_times(rec, "step", "cpu_times")),
            "cpu_share": summary([c / (w * threads) for c, w in zip(_times(rec, "step", "cpu_times"), steps)]),
            "peak_rss_mib": rec.get("peak_rss_mib"), "ready_rss_mib": rec.get("ready_rss_mib"),
            "trainable": rec.get("info", {}).get("trainable"), "total": rec.get("info", {}).get("total"),
            "first_loss": rec.get("metrics", {}).get("first_loss"), "error": rec["error"],
            # Same group: paired by round. Other groups: ratio of medians across time windows (noisier).
            "vs_full": _ratio(steps, _times(full, "step"), paired=same_group),
            "vs_floor": _ratio(steps, _times(floor, "step"), paired=floor is not None and floor["group"] == rec["group"]),
            "vs_full_paired": same_group,
        }
        if peft is not None:
            row["vs_peft_step"] = paired_ratios(steps, _times(peft, "step"))
            row["vs_peft_cpu"] = paired_ratios(_times(rec, "step", "cpu_times"), _times(peft, "step", "cpu_times"))
            row["vs_peft_rss"] = _div(rec.get("peak_rss_mib"), peft.get("peak_rss_mib"))
            row["vs_peft_rss_increase"] = _div(_increase(rec), _increase(peft))
        rows.append(row)
    return rows


def _increase(rec: dict[str, Any]) -> float | None:
    if rec.get("peak_rss_mib") is None or rec.get("ready_rss_mib") is None:
        return None
    return rec["peak_rss_mib"] - rec["ready_rss_mib"]


def _ratio(a: list[float], b: list[float], *, paired: bool) -> dict[str, Any] | None:
    if not a or not b:
        return None
    if paired:
        return paired_ratios(a, b)
    return {**summary([x / summary(b)["median"] for x in a]), "values": []}


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def inference_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latency per (model, runner) for ours and PEFT; forward passes also as a multiple of the same worker's base."""
    rows = []
    for model in sorted({r["model"] for r in records if r["variant"] == "infer"}):
        ours, peft = _find(records, model, "infer", "ours"), _find(records, model, "infer", "peft")
        runners = sorted(set((ours or {}).get("times", {})) | set((peft or {}).get("times", {})), key=_runner_order)
        for runner in runners:
            row = {"model": model, "runner": runner, "rounds": rounds_note(ours or peft or {}),
                   "ours_s": summary(_times(ours, runner)),
                   "peft_s": summary(_times(peft, runner)),
                   "ours_vs_peft": paired_ratios(_times(ours, runner), _times(peft, runner))}
            if not runner.startswith(("surgery", "merge_")):
                row["ours_vs_base"] = paired_ratios(_times(ours, runner), _times(ours, "base"))
                row["peft_vs_base"] = paired_ratios(_times(peft, runner), _times(peft, "base"))
            rows.append(row)
    return rows


def _runner_order(name: str) -> tuple[int, str]:
    prefixes = ["base", "unmerged", "merged", "surgery", "merge_"]
    return next(i for i, p in enumerate(prefixes + [""]) if name.startswith(p)), name


def file_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for tag, f in rec.get("metrics", {}).get("adapter_files", {}).items():
            overhead = f["weights_file_bytes"] / f["raw_param_bytes"] - 1 if f["raw_param_bytes"] else None
            rows.append({"model": rec["model"], "impl": rec["impl"], "targets": tag, **f, "overhead": overhead})
    return rows


def quant_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        q = rec.get("metrics", {}).get("quant")
        if q:
            rows.append({"model": rec["model"], "impl": rec["impl"], **q,
                         "vs_bf16": q["bytes_4bit"] / q["bytes_bf16"], "vs_fp32": q["bytes_4bit"] / q["bytes_fp32"]})
    return rows
