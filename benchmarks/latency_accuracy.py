"""Latency budget on the shipped transfer task (issue 13 (c)): accuracy at equal measured latency.

The shipped accuracy task (benchmarks/accuracy.py: the demo checkpoint vit_nano_patch4_16,
MNIST-5k -> UCI digits, same epochs / lr / schedule / batch / light probe, one torch thread per
run). Steps:
 1. the probe pack of the model is built (cached);
 2. P3B with the MAC budget (`budget="macs"`, residual dims kept whole — the default) at each
    --ratios, for each seed: slim model exported to ONNX;
 3. the pack's probes and those slim models are timed in one interleaved run (ORT CPU,
    --threads, each of --batches): the latency table comes from that run, the MAC models' latencies too;
    target per ratio = the seed-mean measured latency of the MAC-budget models;
 4. P3B with `budget="latency"` on that table at that target (ms), same seeds (`latency`); and
    (`latency-cal`, --calibrated 1) at the table's own predicted latency of the MAC-budget models,
    so that the table's error on these plans cancels (equal predicted latency);
 5. every slim model (both budgets, all seeds) + the dense model timed again in one interleaved
    run — the latencies reported come from this run. Top-1 of the slim model on the val split.
 Steps 3-5 are repeated per --batches (a table and latency-budget runs per batch size).

    python benchmarks/latency_accuracy.py --seeds 0 1 2 --jobs 2
    python benchmarks/latency_accuracy.py --seeds 0 1 2 --jobs 2 --reuse   # same tables/targets, re-timed

Writes benchmarks/results/latency_accuracy.{json,md}. Runs are cached in --work-dir.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import AccuracyBench, _same_config, _top1  # noqa: E402
from latency_budget import timed  # noqa: E402


def run_one(b: AccuracyBench, work: Path, label: str, ratio: float, seed: int, overrides: dict,
            tag: str = "") -> dict[str, Any]:
    """Fine-tune + prune one model like accuracy.run_one (P3B with `overrides`), slim it, evaluate
    the slim model, export it to ONNX. Cached in its run dir."""
    import torch
    torch.set_num_threads(1)
    from p3b_deploy.data import build_loaders
    from p3b_deploy.export import export_onnx
    from p3b_deploy.models.demo import DEMO_MODEL, demo_checkpoint_path
    from p3b_deploy.models.vit import describe, load_model
    from p3b_deploy.pruning import P3BConfig, prune
    from p3b_deploy.surgery.core import slim_run_dir

    run_dir = work / "runs" / tag / f"{label}_r{ratio:g}_s{seed}"
    E = b.epochs
    cfg = P3BConfig(method="p3b", prune_ratio=ratio, epochs=E, start_epoch=b.start_frac * E,
                    sparse_epoch=b.sparse_frac * E, final_epoch=b.final_frac * E, lr=b.lr,
                    batch_size=b.batch_size, seed=seed, probe=b.probe, progress=False, **overrides)
    done = run_dir / "bench_record.json"
    if done.is_file() and _same_config(run_dir, cfg):
        return json.loads(done.read_text())
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    torch.manual_seed(seed)
    model = load_model(DEMO_MODEL, checkpoint=demo_checkpoint_path(), num_classes=10)
    spec = describe(model)
    data = build_loaders("digits", model, batch_size=b.batch_size, seed=seed)
    t0 = time.time()
    res = prune(model, data, cfg, run_dir, {"checkpoint": str(demo_checkpoint_path())})
    train_s = time.time() - t0
    slim = slim_run_dir(run_dir)
    top1 = _top1(slim, data.val)
    onnx = run_dir / "slim.onnx"
    export_onnx(slim, onnx, input_size=(spec.in_chans, *spec.img_size), verify_batches=(1, 2), profile_batch=1,
                profile_runs=1, threads=1)
    lat = (res.plan.meta or {}).get("latency") or {}
    rec = {"label": label, "budget": overrides.get("budget"), "prune_ratio": ratio, "seed": seed,
           "latency_target": overrides.get("latency_target"), "top1": round(top1, 4),
           "params": int(sum(p.numel() for p in slim.parameters())), "macs": int(res.plan.macs["kept"]),
           "removed_blocks": res.plan.removed_branches,
           "plan_pred_ms": lat.get("pred_latency_ms"), "train_seconds": round(train_s, 1), "onnx": str(onnx),
           "run_dir": str(run_dir)}
    done.write_text(json.dumps(rec))
    return rec


def demo_setup(work: Path, threads: int) -> tuple[Path, Path]:
    """The demo model's dense ONNX file and probe pack in `work` (built once, then reused)."""
    from p3b_deploy.export import export_onnx
    from p3b_deploy.export.latency_pack import make_pack
    from p3b_deploy.models.demo import DEMO_MODEL, demo_checkpoint_path
    from p3b_deploy.models.vit import describe, load_model
    dense = load_model(DEMO_MODEL, checkpoint=demo_checkpoint_path(), num_classes=10)
    spec = describe(dense)
    pack = work / "pack"
    if not (pack / "manifest.json").is_file():
        print("building the probe pack", flush=True)
        make_pack(DEMO_MODEL, pack, img_size=spec.img_size[0], num_classes=10, threads=threads)
    dense_onnx = work / "dense.onnx"
    if not dense_onnx.is_file():
        export_onnx(dense, dense_onnx, input_size=(spec.in_chans, *spec.img_size), verify_batches=(1, 2),
                    profile_batch=1, profile_runs=1, threads=1)
    return dense_onnx, pack


def _job(args: tuple) -> dict[str, Any]:
    t0 = time.time()
    rec = run_one(*args)
    print(f"[{time.strftime('%H:%M:%S')}] {rec['label']} r={rec['prune_ratio']:g} seed={rec['seed']}: top-1 "
          f"{rec['top1']:.2f}% params {rec['params']:,} ({time.time() - t0:.0f}s)", flush=True)
    return rec


def run_jobs(jobs: list[tuple], n: int) -> list[dict[str, Any]]:
    if n <= 1:
        return [_job(j) for j in jobs]
    import multiprocessing as mp
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_job, jobs))


def _ms(rec: dict[str, Any]) -> str:
    return f"{rec['label']}_r{rec['prune_ratio']:g}_s{rec['seed']}"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ratio in sorted({r["prune_ratio"] for r in records}):
        for label in ("macs", "latency", "latency-cal"):
            rs = [r for r in records if r["prune_ratio"] == ratio and r["label"] == label]
            if not rs:
                continue
            col = lambda k: np.array([float(r[k]) for r in rs])  # noqa: E731
            sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
            rows.append({"ratio": ratio, "budget": label, "n": len(rs),
                         "top1_mean": float(col("top1").mean()), "top1_std": sd(col("top1")),
                         "ms_mean": float(col("meas_ms").mean()), "ms_std": sd(col("meas_ms")),
                         "params_mean": float(col("params").mean()), "params_std": sd(col("params")),
                         "macs_mean": float(col("macs").mean()), "removed_blocks": float(col("removed_blocks").mean()),
                         "train_seconds": float(col("train_seconds").mean()),
                         "top1_per_seed": [r["top1"] for r in sorted(rs, key=lambda r: r["seed"])],
                         "ms_per_seed": [r["meas_ms"] for r in sorted(rs, key=lambda r: r["seed"])]})
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ratio in sorted({r["ratio"] for r in rows}):
        a = next((r for r in rows if r["ratio"] == ratio and r["budget"] == "macs"), None)
        for b in [r for r in rows if r["ratio"] == ratio and r["budget"] != "macs"]:
            if a is None:
                continue
            d_top1, d_ms = b["top1_mean"] - a["top1_mean"], b["ms_mean"] / a["ms_mean"] - 1
            out.append({"ratio": ratio, "budget": b["budget"], "d_top1": d_top1, "d_ms": d_ms,
                        "at_least_as_accurate": d_top1 >= 0,
                        "within_noise": abs(d_top1) <= max(a["top1_std"], b["top1_std"])})
    return out


def to_markdown(res: dict[str, Any]) -> str:
    s = res["system"]
    L = ["# Latency budget vs MAC budget on the shipped transfer task (issue 13 (c))", "",
         f"- date: {res['date']}; wall time of this invocation {res['wall_s'] / 60:.1f} min "
         f"(runs finished earlier are reused from --work-dir)",
         f"- command: `{res['command']}`",
         f"- machine: {s.get('cpu')} ({s.get('cpu_count')} cores, shared with other jobs), {s.get('platform')}",
         "- versions: " + ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items()),
         f"- task: as benchmarks/accuracy.py — {res['model']} from the shipped MNIST-5k checkpoint fine-tuned on UCI "
         f"digits, {res['bench']['epochs']:g} epochs, batch {res['bench']['batch_size']}, lr {res['bench']['lr']:g}, "
         f"probe `{res['bench']['probe']}`, prune start/sparse/final at 25/50/75% of the epochs, {res['jobs']} runs "
         f"in parallel with 1 torch thread each; P3B, residual dims kept whole (the default); top-1 of the slim model "
         f"on the val split (360 images: one image = 0.28 points); seeds {', '.join(map(str, res['seeds']))}",
         f"- latency: ONNX Runtime CPU, {res['threads']} intra-op thread, batch "
         f"{' and '.join(map(str, res['batches']))}, medians of interleaved runs. Per batch size, the latency table "
         f"was measured on this machine from the probe pack in the same interleaved run as the MAC-budget models; "
         f"the target of each ratio = the **seed-mean** measured latency of the MAC-budget models at that ratio, and "
         f"the `latency` runs were made for that table and target; the `latency-cal` runs for the same table at "
         f"the table's own predicted latency of the MAC-budget models (seed-mean), i.e. equal *predicted* latency, "
         f"which cancels the table's error on these plans. The latencies in the tables below come "
         f"from a second interleaved run of all slim models and the dense model.",
         "- the MAC-budget models are the same runs for every batch size; the latency-budget models are trained "
         "once per batch size (their table differs)", ""]
    for batch, pb in res["per_batch"].items():
        t = pb["table"]
        L += [f"## Batch {batch}", "",
              f"Dense model {pb['dense_ms']:.4f} ms measured; table: dense predicted {t['dense_pred_ms']:.4f} ms "
              f"({t['dense_check'].get('error', float('nan')):+.1%} vs dense measured in the table's run).", "",
              "| MAC-budget ratio | budget | target ms | top-1 (%) | measured ms | table-predicted ms | params | "
              "MACs (K) | removed blocks |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pb["rows"]:
            tgt = pb["targets"][f"{r['ratio']:g}"]
            tgt = tgt.get("cal_target_ms", tgt["target_ms"]) if r["budget"] == "latency-cal" else tgt["target_ms"]
            pred = np.mean([x["table_pred_ms"] for x in pb["records"]
                            if x["prune_ratio"] == r["ratio"] and x["label"] == r["budget"]])
            L.append(f"| {100 * r['ratio']:.0f}% | {r['budget']} | {tgt:.4f} | {r['top1_mean']:.2f} ± "
                     f"{r['top1_std']:.2f} | {r['ms_mean']:.4f} ± {r['ms_std']:.4f} | {pred:.4f} | "
                     f"{r['params_mean']:,.0f} ± {r['params_std']:,.0f} | {r['macs_mean'] / 1e3:,.0f} | "
                     f"{r['removed_blocks']:.1f} |")
        L += ["", "Per seed (top-1 % / measured ms):", ""]
        for r in pb["rows"]:
            L.append(f"- {100 * r['ratio']:.0f}% {r['budget']}: " + ", ".join(
                f"s{s}: {t:.2f} / {m:.4f}" for s, t, m in zip(res["seeds"], r["top1_per_seed"], r["ms_per_seed"])))
        L += ["", "Verdict (mean over seeds; noise = one seed std of either side):", ""]
        for v in pb["verdicts"]:
            what = "at least as accurate" if v["at_least_as_accurate"] else "**less accurate**"
            noise = ", within noise" if v["within_noise"] else ", outside noise"
            L.append(f"- at the latency of the {100 * v['ratio']:.0f}% MAC-budget model: `{v['budget']}` is {what} "
                     f"({v['d_top1']:+.2f} points top-1{noise}); its measured latency {v['d_ms']:+.1%} vs the "
                     f"MAC-budget models.")
        L.append("")
    if res.get("notes"):
        L += ["## Reading", "", res["notes"], ""]
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.85], help="MAC-budget prune ratios")
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency runs")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="ORT batch sizes (one table and "
                    "one set of latency-budget runs each)")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per model per measurement")
    ap.add_argument("--work-dir", default="runs/latency_accuracy")
    ap.add_argument("--out", default="benchmarks/results/latency_accuracy")
    ap.add_argument("--calibrated", type=int, default=1, help="1: also the latency budget at the table's "
                    "predicted latency of the MAC-budget models (`latency-cal`)")
    ap.add_argument("--reuse", action="store_true", help="take each batch's table and targets from the previous "
                    "report (--out .json) instead of timing them again")
    ap.add_argument("--notes", default="", help="free text appended to the report")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from p3b_deploy.bench.latency_table import LatencyTable, pack_models, table_from_report
    from p3b_deploy.bench.sysinfo import system_info
    from p3b_deploy.io import write_json, write_text
    from p3b_deploy.models.demo import DEMO_MODEL

    t_start = time.time()
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    b = AccuracyBench(epochs=args.epochs, jobs=args.jobs)
    dense_onnx, pack = demo_setup(work, args.threads)

    # 2. MAC budget (independent of the batch size)
    mac = run_jobs([(b, work, "macs", r, s, {"budget": "macs"}) for r in args.ratios for s in args.seeds], args.jobs)
    from p3b_deploy.plan import Plan
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/latency_accuracy.py " + " ".join(sys.argv[1:]),
           "system": system_info(args.threads), "model": DEMO_MODEL, "threads": args.threads,
           "batches": args.batches, "jobs": args.jobs, "seeds": args.seeds,
           "bench": {"epochs": b.epochs, "batch_size": b.batch_size, "lr": b.lr, "probe": b.probe},
           "per_batch": {}, "notes": args.notes}
    out = ROOT / args.out
    reuse = {}
    if args.reuse:  # the report this one extends: its tables and targets, its command first
        old = json.loads(Path(str(out) + ".json").read_text())
        reuse, res["command"] = old["per_batch"], old["command"] + "` then `" + res["command"]
    for batch in args.batches:
        # 3. table + MAC models' latency, one interleaved run (or both from a previous report: --reuse)
        tag = f"b{batch}_t{args.threads}"
        table_path = work / f"latency_table_{tag}.json"
        prev = reuse.get(str(batch))
        if prev is not None:
            table, targets = LatencyTable.load(table_path), prev["targets"]
            ms1 = {_ms(r): r["meas_ms_first_run"] for r in prev["records"] if r["label"] == "macs"}
            ms1["dense"] = prev["dense_ms_first_run"]
        else:
            print(f"[b{batch}] timing the probe pack and the MAC-budget models, interleaved", flush=True)
            ms1, rep = timed({"dense": dense_onnx, **pack_models(pack), **{_ms(r): r["onnx"] for r in mac}},
                             batch, args.threads, args.min_seconds)
            table = table_from_report(pack, rep, batch, args.threads)
            table.save(table_path)
            targets = {}
            for ratio in args.ratios:
                m = [ms1[_ms(r)] for r in mac if r["prune_ratio"] == ratio]
                targets[f"{ratio:g}"] = {"target_ms": float(np.mean(m)), "mac_ms_first_run": m}
        for ratio in args.ratios:  # the table's own prediction for the MAC-budget models (its bias removed)
            targets[f"{ratio:g}"]["cal_target_ms"] = float(np.mean([
                table.predict(Plan.load(Path(r["run_dir"]) / "plan.json")) for r in mac if r["prune_ratio"] == ratio]))
        # 4. latency budget at those targets: `latency` = the measured ms; `latency-cal` = the table's predicted
        # ms of the MAC-budget models (equal predicted latency: the table's error on these plans cancels)
        lat = run_jobs([(b, work, label, r, s, {"budget": "latency", "latency_table": str(table_path),
                                                 "latency_target": f"{targets[f'{r:g}'][key]:.5f}ms"}, tag)
                        for label, key in (("latency", "target_ms"), ("latency-cal", "cal_target_ms"))[:1 + args.calibrated]
                        for r in args.ratios for s in args.seeds], args.jobs)
        # 5. every slim model, one interleaved run
        print(f"[b{batch}] timing every slim model, interleaved", flush=True)
        ms2, _ = timed({"dense": dense_onnx, **{_ms(r): r["onnx"] for r in mac + lat}}, batch, args.threads,
                       args.min_seconds)
        records = []
        for r in mac + lat:
            plan = Plan.load(Path(r["run_dir"]) / "plan.json")
            records.append({**r, "meas_ms": ms2[_ms(r)], "meas_ms_first_run": ms1.get(_ms(r)),
                            "table_pred_ms": table.predict(plan)})
        rows = summarise(records)
        res["per_batch"][str(batch)] = {
            "table": {"path": str(table_path.relative_to(ROOT)) if table_path.is_relative_to(ROOT) else str(table_path),
                      "dense_pred_ms": table.dense_ms, "dense_check": table.dense_check,
                      "fixed_ms": table.fixed_ms, "overhead_ms": table.overhead_ms},
            "dense_ms": ms2["dense"], "dense_ms_first_run": ms1["dense"], "targets": targets, "rows": rows,
            "verdicts": verdicts(rows), "records": records}
        res["wall_s"] = time.time() - t_start
        write_json(Path(str(out) + ".json"), res)
        write_text(Path(str(out) + ".md"), to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
