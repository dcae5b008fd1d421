"""Latency tables for the edge targets (issue 24, item 2): how long lowering a probe pack takes per
ExecuTorch / LiteRT target, and how well the table predicts the dense model (the table's dense
check: predicted vs measured in the same interleaved run).

deit_tiny_patch16_224 geometry (random weights), batch 1, 1 thread, default pack (repeats 4,
8 grid steps, 6 calibration plans). Lowering runs in one process, one probe after the other
(`p3b_deploy.export.edge_probes`); the lowered files are cached under the pack, so a rerun reuses
them (delete <work>/pack/<variant>/ to time the lowering again).
Goal (issue): an ExecuTorch table of deit_tiny within 15 min on this machine.

    .venv-edge/bin/python benchmarks/edge_tables.py --targets executorch,litert-fp32
Writes benchmarks/results/edge_tables.{json,md} (--out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p3b_deploy.bench.latency_table import measure_pack, read_manifest  # noqa: E402
from p3b_deploy.bench.sysinfo import system_info  # noqa: E402
from p3b_deploy.export.edge_probes import lower_probes  # noqa: E402
from p3b_deploy.targets import get_target  # noqa: E402

MODEL = "deit_tiny_patch16_224"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="executorch,litert-fp32,executorch-int8,litert-int8")
    ap.add_argument("--work-dir", default="runs/edge_tables")
    ap.add_argument("--out", default="benchmarks/results/edge_tables")
    ap.add_argument("--budget-min", type=float, default=45.0, help="skip targets once this many minutes are spent")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    pack = work / "pack"
    t0 = time.perf_counter()
    try:
        read_manifest(pack)
        pack_s = None
    except Exception:  # noqa: BLE001 — no pack yet
        from p3b_deploy.export.latency_pack import make_pack
        pack_s = make_pack(MODEL, pack, threads=1).seconds
    rows, skipped = [], []
    for name in args.targets.split(","):
        spent = (time.perf_counter() - t0) / 60
        if spent > args.budget_min:
            skipped.append({"target": name, "reason": f"time budget ({args.budget_min:.0f} min) spent"})
            continue
        t = get_target(name, threads=1, batch=1)
        reason = t.unavailable()
        if reason:
            skipped.append({"target": name, "reason": reason})
            continue
        low = lower_probes(pack, t, 1)
        t1 = time.perf_counter()
        table = measure_pack(pack, batch=1, threads=1, target=t, min_seconds=1.0, warmup_seconds=0.5)
        table.save(work / f"{name}.json")
        dc = table.dense_check
        rows.append({"target": name, "probes": len(low.files), "lowered": len(low.lowered),
                     "lower_seconds": low.seconds, "time_seconds": round(time.perf_counter() - t1, 1),
                     "dense_measured_ms": dc["measured_ms"], "dense_predicted_ms": dc["predicted_ms"],
                     "dense_error": dc["error"], "correction": table.correction.get("model"),
                     "correction_median_abs_error": table.correction.get("median_abs_error")})
        print(rows[-1], flush=True)
    res = {"model": MODEL, "batch": 1, "threads": 1, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "load_average": os.getloadavg(), "system": system_info(1), "pack_seconds": pack_s,
           "rows": rows, "skipped": skipped}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    lines = [f"# Latency tables on the edge targets ({MODEL}, batch 1, 1 thread)", "",
             f"{res['date']}; load average {', '.join(f'{v:.2f}' for v in res['load_average'])} (2 cores shared "
             "with another job); versions in the JSON. Pack: repeats 4, 8 grid steps, 6 calibration plans "
             f"({'made in %.0f s' % pack_s if pack_s else 'reused'}).", "",
             "| target | probes lowered | lowering (s) | timing (s) | dense predicted / measured (ms) | error | "
             "correction |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['lowered']}/{r['probes']} | {r['lower_seconds']:.0f} | "
                     f"{r['time_seconds']:.0f} | {r['dense_predicted_ms']:.2f} / {r['dense_measured_ms']:.2f} | "
                     f"{100 * r['dense_error']:+.1f}% | {r['correction']} |")
    for s in skipped:
        lines.append(f"| {s['target']} | skipped: {s['reason']} | | | | | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
