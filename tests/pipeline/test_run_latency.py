"""`run` with a latency target: the summary sets predicted against measured speedup."""
from __future__ import annotations

import pytest

from p3b_deploy.pipeline.latency import latency_markdown, latency_summary


def test_latency_summary_pairs_prediction_with_the_bench_row():
    rec = {"table": "OUT/latency_table.json", "batch": 1, "target_ms": 0.6, "dense_pred_ms": 1.2}
    meta = {"latency": {"pred_latency_ms": 0.59, "pred_speedup": 2.03, "allocation": "knapsack",
                        "removed_branches": 7}}
    rows = [{"model": "dense", "backend": "ort-cpu", "batch": 1, "median_ms": 1.3, "speedup": 1.0},
            {"model": "slim", "backend": "ort-cpu", "batch": 32, "median_ms": 9.0, "speedup": 2.5},
            {"model": "slim", "backend": "ort-cpu", "batch": 1, "median_ms": 0.7, "speedup": 1.86}]
    s = latency_summary(rec, meta, rows)
    assert (s["pred_speedup"], s["measured_speedup"], s["measured_ms"]) == (2.03, 1.86, 0.7)
    text = "\n".join(latency_markdown(s))
    assert "predicts 0.590 ms" in text and "2.03x" in text and "1.86x" in text
    assert "Allocation: knapsack, 7 branches removed" in text


@pytest.mark.slow
def test_run_with_latency_target(tmp_path):
    from p3b_deploy.pipeline.run import RunConfig, run_pipeline
    cfg = RunConfig.from_dict({"out": str(tmp_path / "out"), "dense_baseline": False, "latency_target": "0.6",
                               "prune": {"epochs": 1.0}, "bench": {"backends": ["ort-cpu"], "threads": 1,
                                                                   "min_seconds": 0.3, "batches": [1]}})
    res = run_pipeline(cfg)
    s = res.summary["latency_budget"]
    assert s["pred_ms"] <= s["target_ms"] + 1e-9 and s["measured_speedup"] > 1.0
    assert s["allocation"] == "knapsack" and s["removed_branches"] >= 1  # run's latency target: the knapsack
    assert (tmp_path / "out" / "latency_table.json").is_file()
    assert "Latency budget" in (tmp_path / "out" / "summary.md").read_text()
