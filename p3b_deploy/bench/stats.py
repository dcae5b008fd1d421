"""Latency statistics of one timed loop (numpy only)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

CV_LIMIT = 0.05  # coefficient of variation above which a measurement is flagged as noisy


def latency_stats(times_ms: Sequence[float], batch: int) -> dict:
    """min/mean/median/p90/p95/p99/std/CV of per-iteration times, and throughput in images/s.

    Throughput uses the median (robust against the occasional preempted iteration)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed iterations")
    med = float(np.median(t))
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    cv = std / mean if mean > 0 else 0.0
    return {
        "min_ms": float(t.min()), "mean_ms": mean, "median_ms": med,
        "p90_ms": float(np.percentile(t, 90)), "p95_ms": float(np.percentile(t, 95)),
        "p99_ms": float(np.percentile(t, 99)), "std_ms": std, "cv": cv, "noisy": bool(cv > CV_LIMIT),
        "iters": int(t.size), "timed_s": float(t.sum() / 1e3),
        "throughput": batch * 1e3 / med if med > 0 else float("inf"),
    }
