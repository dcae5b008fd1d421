"""`run` with a latency target: the probe pack is built and timed on this machine, then P3B prunes
for the target under that table (RunConfig.latency_target), and the summary sets the table's
predicted speedup next to the one measured for the exported slim model."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def stage_latency_table(cfg: Any, out: Path) -> dict[str, Any]:
    """OUT/latency_pack/ + OUT/latency_table.json, timed like the bench stage (ORT CPU, its threads,
    its first batch size)."""
    from ..bench.latency_table import measure_pack
    from ..export.latency_pack import make_pack
    threads, batch = cfg.bench.get("threads"), int((cfg.bench.get("batches") or [1])[0])
    pack = make_pack(cfg.model, out / "latency_pack", img_size=cfg.img_size, patch_size=cfg.patch_size,
                     num_classes=cfg.num_classes, threads=threads)
    table = measure_pack(pack.path, batch=batch, threads=threads, provider="cpu")
    table.save(out / "latency_table.json")
    return {"table": str(out / "latency_table.json"), "batch": batch, "threads": threads,
            "dense_pred_ms": table.dense_ms, "target_ms": table.target_ms(cfg.latency_target),
            "dense_check": table.dense_check}


def with_latency_budget(pcfg: Any, rec: dict[str, Any], target: str) -> Any:
    """The prune config budgeting the measured table's milliseconds."""
    return pcfg.replace(budget="latency", latency_table=rec["table"], latency_target=str(target))


def latency_summary(rec: dict[str, Any], plan_meta: dict[str, Any], bench_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted (table) vs measured (bench, ORT CPU at the table's batch) speedup of the slim model."""
    lat = plan_meta.get("latency") or {}
    row = next((r for r in bench_rows if r.get("model") == "slim" and r.get("backend") == "ort-cpu"
                and r.get("batch") == rec["batch"]), {})
    return {"table": rec["table"], "batch": rec["batch"], "target_ms": rec["target_ms"],
            "pred_ms": lat.get("pred_latency_ms"), "dense_pred_ms": rec["dense_pred_ms"],
            "pred_speedup": lat.get("pred_speedup"), "measured_speedup": row.get("speedup"),
            "allocation": lat.get("allocation"), "removed_branches": lat.get("removed_branches"),
            "measured_ms": row.get("median_ms")}


def latency_markdown(s: dict[str, Any]) -> list[str]:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return ["## Latency budget (table measured on this machine)", "",
            f"Target {s['target_ms']:.3f} ms at batch {s['batch']} (ORT CPU); the table predicts "
            f"{f(s['pred_ms'], '.3f')} ms for the plan ({f(s['pred_speedup'], '.2f')}x vs dense "
            f"{s['dense_pred_ms']:.3f} ms); measured for the exported slim model: {f(s['measured_ms'], '.3f')} ms, "
            f"{f(s['measured_speedup'], '.2f')}x. Allocation: {s.get('allocation') or '-'}, "
            f"{f(s.get('removed_branches'), 'd')} branches removed. Table: `{s['table']}`.", ""]
