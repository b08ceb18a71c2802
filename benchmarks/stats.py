"""Summaries of repeated timings: median, quartiles, min-max; paired ratios between two implementations."""

from __future__ import annotations

import statistics
from typing import Any


def summary(values: list[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method), min, max and count of ``values``; NaNs for an empty list."""
    if not values:
        nan = float("nan")
        return {"n": 0, "median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"n": len(values), "median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values),
            "max": max(values)}


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Ratios of values measured in the same round (same time window), summarised.

    Pairing by round cancels most of the machine's slow drift: a round where the machine is busy slows both sides.
    """
    ratios = [a / b for a, b in zip(numerators, denominators) if b > 0]
    return {**summary(ratios), "values": ratios}


def ratio_of_medians(a: list[float], b: list[float]) -> float:
    if not a or not b:
        return float("nan")
    return statistics.median(a) / statistics.median(b)
