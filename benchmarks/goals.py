"""The issue's targets, checked against a run's rows. Each check says what was measured and whether it is met."""

from __future__ import annotations

import math
from typing import Any


def _check(goal: str, target: str, value: float | None, limit: float, spread: str = "",
           within_noise: bool = False, fmt: str = "ratio") -> dict[str, Any]:
    """``fmt`` says how to print ``value``: ``"ratio"`` (1.013), ``"pct"`` (+1.3%), ``"s"`` (0.123 s), ``"str"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"goal": goal, "target": target, "value": None, "met": None, "spread": spread, "within_noise": False,
                "fmt": fmt}
    met = value <= limit
    return {"goal": goal, "target": target, "value": value, "met": met, "spread": spread,
            "within_noise": (not met) and within_noise, "fmt": fmt}


def _spread(s: dict[str, Any] | None) -> str:
    return "" if not s or not s.get("n") else f"IQR {s['q1']:.3f}-{s['q3']:.3f}, min-max {s['min']:.3f}-{s['max']:.3f}"


def _paired(goal: str, target: str, s: dict[str, Any] | None, limit: float) -> dict[str, Any]:
    if not s or not s.get("n"):
        return _check(goal, target, None, limit)
    return _check(goal, target, s["median"], limit, _spread(s), within_noise=s["q1"] <= limit)


def check_goals(train: list[dict[str, Any]], infer: list[dict[str, Any]], files: list[dict[str, Any]],
                imports: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every goal of the issue that this run measured, in the table's order."""
    goals = []
    for row in train:
        if row["impl"] == "ours" and "vs_peft_step" in row:
            tag = f"{row['model']} {row['label']}"
            goals.append(_paired(f"step time ours/PEFT: {tag}", "<= 1.00", row["vs_peft_step"], 1.00))
            goals.append(_check(f"peak RSS ours/PEFT: {tag}", "<= 1.00", row["vs_peft_rss"], 1.00))
    for row in train:
        if row["variant"] == "lora_qv" and row["impl"] in ("ours", "peft") and row["vs_floor"]:
            ours = row["impl"] == "ours"
            goal = _paired(f"LoRA q,v step / floor ({row['impl']}): {row['model']}",
                           "<= 1.02" if ours else "(PEFT, this run)", row["vs_floor"], 1.02)
            if not ours:
                goal.update(met=None, within_noise=False)  # PEFT's figure is context, not a goal of ours
            goals.append(goal)
    goals += _inference_goals(infer)
    for f in files:
        if f["impl"] == "ours":
            goals.append(_check(f"adapter file / raw parameter bytes: {f['model']} {f['targets']}", "<= 1.01",
                                f["weights_file_bytes"] / f["raw_param_bytes"], 1.01))
    if imports:
        inc = imports["increment_after_lightning_s"]
        goals.append(_check("`import lightning_lora` after `import lightning` (s)", "< 0.5", inc["median"], 0.5,
                            _spread(inc), fmt="s"))
        goals.append({"goal": "`import lightning_lora` imports peft", "target": "no",
                      "value": "yes" if imports["imports_peft"] else "no", "met": not imports["imports_peft"],
                      "spread": "", "within_noise": False, "fmt": "str"})
    return goals


def _inference_goals(infer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    goals = []
    by_key = {(r["model"], r["runner"]): r for r in infer}
    for (model, runner), row in by_key.items():
        if runner.startswith("merged_"):
            goals.append(_paired(f"merged / base latency (ours): {model} {runner[7:]}", "<= 1.02",
                                 row["ours_vs_base"], 1.02))
        if runner.startswith("unmerged_"):
            ours, peft = row["ours_vs_base"], row["peft_vs_base"]
            if ours.get("n") and peft.get("n"):
                goals.append(_check(f"unmerged overhead vs base, ours vs PEFT: {model} {runner[9:]}",
                                    f"<= PEFT's ({peft['median'] - 1:+.1%})", ours["median"] - 1,
                                    peft["median"] - 1, f"ours/PEFT latency {row['ours_vs_peft']['median']:.3f}",
                                    within_noise=ours["q1"] <= peft["q3"], fmt="pct"))
    return goals
