"""`run` with a latency target: the probe pack is built and timed on this machine on the run's
deployment target (`--target`, default ort-fp32), P3B prunes for the target under that table
(RunConfig.latency_target), and the summary checks the promise: the table's prediction and the
target latency against the slim model measured on the target (the deploy stage, interleaved with
the dense model), with its top-1 on that runtime."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..targets import Target, get_target


def run_target(cfg: Any) -> Target:
    """The run's deployment target at the bench's threads and first batch size."""
    t = get_target(cfg.target or "ort-fp32")
    return replace(t, threads=cfg.bench.get("threads"), batch=int((cfg.bench.get("batches") or [1])[0]))


def stage_latency_table(cfg: Any, out: Path) -> dict[str, Any]:
    """OUT/latency_pack/ + OUT/latency_table.json, timed on the run's target."""
    from ..deploy.latency import target_table
    t = run_target(cfg)
    table, path = target_table(cfg.model, out, t, img_size=cfg.img_size, patch_size=cfg.patch_size,
                               num_classes=cfg.num_classes)
    return {"table": str(path), "target": t.name, "batch": t.batch, "threads": t.threads,
            "dense_pred_ms": table.dense_ms, "target_ms": table.target_ms(cfg.latency_target),
            "dense_check": table.dense_check, "correction": {k: table.correction.get(k) for k in
                                                             ("scale", "per_branch_ms", "median_abs_error")}}


def with_latency_budget(pcfg: Any, rec: dict[str, Any], target: str) -> Any:
    """The prune config budgeting the measured table's milliseconds."""
    return pcfg.replace(budget="latency", latency_table=rec["table"], latency_target=str(target),
                        target=rec.get("target"))


def latency_summary(rec: dict[str, Any], plan_meta: dict[str, Any], bench_rows: list[dict[str, Any]],
                    deploy_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Predicted (table) vs measured latency of the slim model, and the promise check.

    Measured on the target: the deploy stage's row (slim, target, batch) when there is one, else
    the bench stage's ORT CPU row (fp32 targets). The promise is kept when the measured latency is
    at most the target latency."""
    lat = plan_meta.get("latency") or {}
    target = rec.get("target", "ort-fp32")
    row = next((r for r in deploy_rows or [] if r.get("model") == "slim" and r.get("target") == target
                and r.get("batch") == rec["batch"] and r.get("median_ms") is not None), None)
    dense = next((r for r in deploy_rows or [] if r.get("model") == "dense" and r.get("target") == target
                  and r.get("batch") == rec["batch"] and r.get("median_ms") is not None), None)
    source = f"deploy stage ({target})"
    if row is None and target == "ort-fp32":
        row = next((r for r in bench_rows if r.get("model") == "slim" and r.get("backend") == "ort-cpu"
                    and r.get("batch") == rec["batch"]), None)
        dense = next((r for r in bench_rows if r.get("model") == "dense" and r.get("backend") == "ort-cpu"
                      and r.get("batch") == rec["batch"]), None)
        source = "bench stage (ORT CPU fp32)"
    row, dense = row or {}, dense or {}
    measured = row.get("median_ms")
    on_target = source.startswith("deploy")  # matrix speedups are vs dense ORT fp32: take dense on the target
    measured_speedup = (dense["median_ms"] / measured if on_target and dense.get("median_ms") and measured
                        else row.get("speedup"))
    return {"table": rec["table"], "target": target, "batch": rec["batch"], "threads": rec.get("threads"),
            "target_ms": rec["target_ms"], "pred_ms": lat.get("pred_latency_ms"), "dense_pred_ms": rec["dense_pred_ms"],
            "pred_speedup": lat.get("pred_speedup"), "measured_speedup": measured_speedup,
            "allocation": lat.get("allocation"), "removed_branches": lat.get("removed_branches"),
            "measured_ms": measured, "dense_measured_ms": dense.get("median_ms"), "top1": row.get("top1"),
            "dense_top1": dense.get("top1"), "measured_by": source if measured is not None else None,
            "promise_kept": None if measured is None else bool(measured <= rec["target_ms"])}


def latency_markdown(s: dict[str, Any]) -> list[str]:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    target = s.get("target", "ort-fp32")
    if s.get("promise_kept") is None:
        verdict = "not checked: the slim model was not measured on the target"
    elif s["promise_kept"]:
        verdict = f"**kept**: measured {s['measured_ms']:.3f} ms <= target {s['target_ms']:.3f} ms"
    else:
        verdict = (f"**missed**: measured {s['measured_ms']:.3f} ms > target {s['target_ms']:.3f} ms "
                   f"({s['measured_ms'] / s['target_ms'] - 1:+.1%})")
    return [f"## Latency budget on {target} (table measured on this machine)", "",
            f"Promise {verdict}.", "",
            "| | target | predicted (table) | measured on the target | top-1 on the target |",
            "|---|---:|---:|---:|---:|",
            f"| slim | {s['target_ms']:.3f} ms | {f(s['pred_ms'], '.3f')} ms | {f(s['measured_ms'], '.3f')} ms | "
            f"{f(s.get('top1'), '.2f')} |",
            f"| dense | | {s['dense_pred_ms']:.3f} ms | {f(s.get('dense_measured_ms'), '.3f')} ms | "
            f"{f(s.get('dense_top1'), '.2f')} |", "",
            f"Batch {s['batch']}, threads {s.get('threads') or 'default'}; predicted speedup "
            f"{f(s['pred_speedup'], '.2f')}x, measured {f(s['measured_speedup'], '.2f')}x "
            f"({s.get('measured_by') or '-'}). Allocation: {s.get('allocation') or '-'}, "
            f"{f(s.get('removed_branches'), 'd')} branches removed. Table: `{s['table']}`.", ""]
