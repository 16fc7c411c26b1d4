"""Paired differences between two methods over the same draws, with a bootstrap interval.

Every method of a label-efficiency run is trained on the same drawn scenes, so the question "does
A beat B?" is answered per draw (``A - B`` on draw ``d``), not by comparing two means whose spread
is mostly the luck of the draw. The interval is the percentile bootstrap over draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 10_000


def bootstrap_interval(
    values: list[float], level: float = 0.9, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """``(low, high)`` percentile-bootstrap interval of the mean of ``values`` at ``level``
    (resampling the values with replacement); both equal the value for a single one."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(samples, v.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_differences(
    rows: list[dict[str, Any]], method: str, baseline: str, metric: str = "test_miou", level: float = 0.9
) -> list[dict[str, Any]]:
    """Per ``k``: ``method - baseline`` of ``metric`` on each draw both ran, their mean and interval.

    Returns:
        one dict per ``k`` both methods ran: ``method``, ``baseline``, ``k``, ``draws`` (the draw
        ids), ``differences`` (per draw, in draw order), ``mean``, ``low``, ``high``, ``level``,
        ``wins`` (draws where ``method`` is ahead).
    """
    by = {(r["method"], r["k"], r["draw"]): float(r[metric]) for r in rows}
    out = []
    for k in sorted({r["k"] for r in rows}):
        draws = sorted(d for (m, kk, d) in by if m == method and kk == k and (baseline, k, d) in by)
        if not draws:
            continue
        diffs = [by[(method, k, d)] - by[(baseline, k, d)] for d in draws]
        low, high = bootstrap_interval(diffs, level)
        out.append({
            "method": method, "baseline": baseline, "k": k, "draws": draws, "differences": diffs,
            "mean": float(np.mean(diffs)), "low": low, "high": high, "level": level,
            "wins": int(sum(x > 0 for x in diffs)),
        })  # fmt: skip
    return out


def format_paired(entries: list[dict[str, Any]], unit: str) -> str:
    """Markdown: one row per (method, baseline, k): mean difference in mIoU points, its interval,
    wins, and each draw's difference."""
    level = round(100 * entries[0]["level"]) if entries else 90
    lines = [
        f"| paired difference, test mIoU points | k | mean | {level}% interval (bootstrap over draws) "
        "| wins | per draw |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        per = " / ".join(f"{100 * x:+.1f}" for x in e["differences"])
        lines.append(
            f"| {e['method']} vs {e['baseline']} | {e['k']} {unit} | {100 * e['mean']:+.1f} "
            f"| [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}] | {e['wins']}/{len(e['draws'])} | {per} |"
        )
    return "\n".join(lines)
