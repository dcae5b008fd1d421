"""Does pricing on the deployment target pay? (issue 24, item 5)

The shipped task (demo checkpoint vit_nano_patch4_16, MNIST-5k -> UCI digits, the accuracy
benchmark's 8-epoch schedule), batch 1, 1 thread. Per target T (default ort-int8 and openvino-int8):
 1. the probe pack (with its calibration plans) timed on ORT fp32 and on T -> two latency tables;
 2. P3B with the knapsack latency budget at 0.5x and 0.35x of dense, priced (a) on T's own table
    and (b) on the ORT fp32 table (what `run --latency-target` did before targets), 3 seeds;
 3. every slim model exported as T's file (int8 dynamic / static QDQ calibrated on 256 training
    images, like `export --target T`), then the dense and all slim T files timed interleaved on T;
    top-1 of every T file on T's runtime on the digits val split;
 4. per pricing and fraction: measured latency on T vs the promise (fraction x dense measured on
    T in the same run), top-1 on T, removed branches.

    python benchmarks/latency_target_pays.py --seeds 0 1 2 --jobs 2

Writes benchmarks/results/latency_target_pays.{json,md}. Runs are cached in --work-dir.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import AccuracyBench  # noqa: E402
from latency_accuracy import demo_setup, run_jobs  # noqa: E402

FRACTIONS = (0.5, 0.35)


def t_file(rec_onnx: Path, model: Any, target: Any, calib: Any, x: Any, y: Any, input_size: tuple) -> Path:
    """The model's file for `target` (int8 exported like `export --target`), next to its fp32 file;
    `model()` builds the torch model when the file is not there yet."""
    import torch
    from p3b_deploy.export import export_onnx
    if target.int8 is None:
        return rec_onnx
    out = rec_onnx.with_name(f"{rec_onnx.stem}-{target.variant}.onnx")
    made = out.with_name(out.stem + ".int8.onnx")
    if not made.is_file():
        model = model()
        torch.set_num_threads(1)
        export_onnx(model.eval(), out, input_size=input_size, int8=target.int8,
                    calibration_data=calib if target.int8 == "static" else None, verify_data=x, verify_labels=y,
                    int8_max_drop=100.0, verify_batches=(1, 2), profile_batch=1, profile_runs=1, threads=1)
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", default="ort-int8,openvino-int8")
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--work-dir", default="runs/latency_target_pays")
    ap.add_argument("--out", default="benchmarks/results/latency_target_pays")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from p3b_deploy.bench.latency_table import target_probes, table_from_report
    from p3b_deploy.bench.sysinfo import system_info
    from p3b_deploy.deploy import benchmark
    from p3b_deploy.deploy.matrix import logits_on
    from p3b_deploy.export.exporter import real_images
    from p3b_deploy.io import write_json, write_text
    from p3b_deploy.models.demo import DEMO_MODEL, demo_checkpoint_path
    from p3b_deploy.models.vit import load_model
    from p3b_deploy.surgery.core import slim_run_dir
    from p3b_deploy.targets import get_target

    t0 = time.time()
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    b = AccuracyBench(epochs=args.epochs, jobs=args.jobs)
    dense_onnx, pack = demo_setup(work, 1)
    model = load_model(DEMO_MODEL, checkpoint=demo_checkpoint_path(), num_classes=10)
    x, y, _, calib = real_images("digits", model, 1000, calibration=256)
    ref = get_target("ort-fp32", threads=1, batch=1)
    tables = {}
    for t in [ref, *(get_target(n, threads=1, batch=1) for n in args.targets.split(","))]:
        path = work / f"table_{t.name}.json"
        if not path.is_file():
            print(f"timing the probe pack on {t.name}", flush=True)
            rep = benchmark(target_probes(pack, t), backends=[t.backend], batches=[1], threads=1,
                            precision=t.precision, warmup_seconds=0.0, warmup_iters=3, min_iters=5,
                            min_seconds=args.min_seconds)
            table_from_report(pack, rep, 1, 1, target=t).save(path)
        tables[t.name] = path
    jobs = []
    for frac in FRACTIONS:
        for priced in ["ort-fp32", *args.targets.split(",")]:
            for s in args.seeds:
                jobs.append((b, work, f"{priced}_x{frac:g}", 0.5, s,
                             {"budget": "latency", "allocation": "knapsack", "latency_table": str(tables[priced]),
                              "latency_target": f"{frac:g}", "target": priced}, "knapsack"))
    recs = run_jobs(jobs, args.jobs)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/latency_target_pays.py " + " ".join(sys.argv[1:]),
           "system": system_info(1), "model": DEMO_MODEL, "seeds": args.seeds,
           "bench": {"epochs": b.epochs, "batch_size": b.batch_size, "lr": b.lr, "probe": b.probe}, "targets": {}}
    for tname in args.targets.split(","):
        t = get_target(tname, threads=1, batch=1)
        mine = [r for r in recs if r["label"].split("_x")[0] in ("ort-fp32", tname)]
        print(f"[{tname}] exporting {len(mine) + 1} files for the target", flush=True)
        size = tuple(int(v) for v in x.shape[1:])
        files = {"dense": t_file(dense_onnx, lambda: model, t, calib, x, y, size)}
        for r in mine:
            files[f"{r['label']}_s{r['seed']}"] = t_file(Path(r["onnx"]), lambda r=r: slim_run_dir(r["run_dir"]), t,
                                                         calib, x, y, size)
        load = os.getloadavg()
        print(f"[{tname}] timing {len(files)} files interleaved on the target", flush=True)
        rep = benchmark({k: str(v) for k, v in files.items()}, backends=[t.backend], batches=[1], threads=1,
                        precision=t.precision, warmup_seconds=0.0, warmup_iters=3, min_iters=10,
                        min_seconds=args.min_seconds)
        ms = {r["model"]: float(r["median_ms"]) for r in rep.results}
        top1 = {}
        for k, f in files.items():
            logits = logits_on(t.backend, t.precision, f, x.numpy(), work, 1)
            top1[k] = 100.0 * float((logits.argmax(1) == y.numpy()).mean())
        rows = []
        for frac in FRACTIONS:
            for priced in ("ort-fp32", tname):
                rs = [r for r in mine if r["label"] == f"{priced}_x{frac:g}"]
                keys = [f"{r['label']}_s{r['seed']}" for r in rs]
                m = np.array([ms[k] for k in keys])
                rows.append({"fraction": frac, "priced_on": priced, "n": len(rs),
                             "promise_ms": frac * ms["dense"], "meas_ms_mean": float(m.mean()),
                             "meas_ms_per_seed": [round(v, 4) for v in m],
                             "vs_dense_on_target": float(m.mean() / ms["dense"]),
                             "kept": int(sum(v <= frac * ms["dense"] for v in m)),
                             "top1_mean": float(np.mean([top1[k] for k in keys])),
                             "top1_per_seed": [round(top1[k], 2) for k in keys],
                             "removed_mean": float(np.mean([r["removed_blocks"] for r in rs]))})
        res["targets"][tname] = {"dense_ms": ms["dense"], "dense_top1": top1["dense"], "rows": rows,
                                 "load_before": list(load), "load_after": list(os.getloadavg())}
        res["wall_s"] = time.time() - t0
        write_json(Path(str(ROOT / args.out) + ".json"), res)
        write_text(Path(str(ROOT / args.out) + ".md"), to_markdown(res))
    print(to_markdown(res))
    return 0


def to_markdown(res: dict[str, Any]) -> str:
    s = res["system"]
    lines = ["# Does pricing on the deployment target pay?", "",
             f"Date {res['date']}; CPU {s.get('cpu')}; 1 thread, batch 1; "
             + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()), "",
             f"Command: `{res['command']}`", "",
             f"Shipped task ({res['model']}, MNIST-5k -> UCI digits, {res['bench']['epochs']:g} epochs), seeds "
             f"{res['seeds']}. P3B knapsack at a fraction of dense, priced on the target's own latency table or on "
             "the ORT fp32 table; every model then exported as the target's file and timed on the target, "
             "interleaved with the dense file of the target. Promise = fraction x dense measured on the target in "
             "that run; 'kept' counts the seeds whose model meets it. Top-1 on the target's runtime.", ""]
    for tname, tr in res["targets"].items():
        lines += [f"## {tname}", "", f"Dense (the source checkpoint, not fine-tuned on digits) on {tname}: "
                  f"{tr['dense_ms']:.3f} ms, top-1 {tr['dense_top1']:.2f}%; "
                  f"load {tr['load_before'][0]:.1f} -> {tr['load_after'][0]:.1f}.", "",
                  "| fraction | priced on | promise ms | measured ms (mean) | x dense | kept | top-1 % (mean) "
                  "| removed branches |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in tr["rows"]:
            lines.append(f"| {r['fraction']:g} | {r['priced_on']} | {r['promise_ms']:.3f} | {r['meas_ms_mean']:.3f} "
                         f"| {r['vs_dense_on_target']:.2f} | {r['kept']}/{r['n']} | {r['top1_mean']:.2f} "
                         f"| {r['removed_mean']:.1f} |")
        lines.append("")
    lines += ["x86 server CPU, not a phone or an edge board.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
