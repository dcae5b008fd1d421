"""ExecuTorch int8 (XNNPACK PT2E static) vs fp32 on the shipped task: accuracy and latency.

The slim model (or, with --model dense, the dense one) of the offline default run (`p3b-deploy
run`: vit_nano_patch4_16 adapted to UCI digits, 50% of the parameters removed) is exported as users get
it, `export_onnx(..., format="executorch", int8="static")` with the digits val images as the gate
and 256 digits training images as calibration: <model>.onnx, <model>.int8.onnx (ORT static QDQ),
<model>.pte (XNNPACK fp32) and <model>.int8.pte (XNNPACK int8). Then top-1 of each file on the whole
digits val split, and median latency at batch 1 with 1 thread, all files timed interleaved
(round robin). ExecuTorch on x86 is not a phone: these are ratios on this CPU.

Needs .venv-edge (bash scripts/setup_edge.sh):
    .venv-edge/bin/python benchmarks/executorch_int8.py --run runs/demo
Writes benchmarks/results/executorch_int8_<model>.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from p3b_deploy.bench.sysinfo import system_info
from p3b_deploy.executorch_io import load_pte, set_threads
from p3b_deploy.export import export_onnx
from p3b_deploy.io import write_json, write_text
from p3b_deploy.onnx_io import load_onnx_session


def demo_model(run: Path, which: str):
    """The run's slim (fine-tuned when there is one) or dense model, with the digits val images
    and 256 training images (the export's calibration set)."""
    from p3b_deploy.artifacts import run_dir, slim_dir
    from p3b_deploy.export.exporter import real_images
    if which == "dense":
        model = run_dir(run / "dense_run").load_dense().eval()
    else:
        model = slim_dir(run / "slim_ft" if (run / "slim_ft").is_dir() else run / "slim").load().eval()
    x, y, _, calib = real_images("digits", model, 100000, calibration=256)
    return model, x, y, calib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a finished demo run dir (`p3b-deploy run`)")
    p.add_argument("--model", default="slim", choices=("slim", "dense"), help="which of the run's models")
    p.add_argument("--rounds", type=int, default=200, help="interleaved rounds (one run of each file per round)")
    p.add_argument("--work-dir", default="/tmp/p3b-et-int8")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    set_threads(1)
    model, x, y, calib = demo_model(Path(args.run), args.model)
    s = args.model  # file stem
    fp32_pte, int8_pte = f"{s}.pte", f"{s}.int8.pte"
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = export_onnx(model, work / f"{s}.onnx", input_size=tuple(x.shape[1:]), format="executorch", int8="static",
                      verify_data=x[:256], verify_labels=y[:256], calibration_data=calib, threads=1)
    print(res.summary(), flush=True)
    export_s = time.time() - t0
    xs, labels = x.numpy().astype(np.float32), y.numpy()
    runs = {}
    for name in (f"{s}.onnx", f"{s}.int8.onnx"):
        sess, _ = load_onnx_session(work / name, threads=1)
        runs[name] = lambda b, s=sess: s.run(None, {"images": b})[0]
    for name in (fp32_pte, int8_pte):
        runs[name] = load_pte(work / name).forward
    with torch.no_grad():
        top1 = {"torch fp32": 100.0 * float((model(x).argmax(1).numpy() == labels).mean())}
    for name, fn in runs.items():
        got = np.concatenate([fn(xs[i:i + 8]) for i in range(0, len(xs), 8)])
        top1[name] = 100.0 * float((got.argmax(1) == labels).mean())
    one = xs[:1]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        for _ in range(10):
            fn(one)
    for _ in range(args.rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn(one)
            times[k].append((time.perf_counter() - t) * 1e3)
    med = {k: float(np.median(v)) for k, v in times.items()}
    cv = {k: float(np.std(v) / np.mean(v)) for k, v in times.items()}
    et = res.executorch
    out = {"system": system_info(1), "command": " ".join(["python", *sys.argv]), "val_images": len(xs),
           "export_seconds": export_s, "lower_seconds": {fp32_pte: et.lower_seconds, int8_pte: et.int8.lower_seconds},
           "partitions": {fp32_pte: et.delegated_subgraphs, int8_pte: et.int8.delegated_subgraphs},
           "sizes": {k: (work / k).stat().st_size for k in runs}, "top1": top1, "median_ms": med, "cv": cv,
           "rounds": args.rounds, "export": res.to_dict()}
    lines = ["# ExecuTorch int8 (XNNPACK PT2E static) vs fp32 on the shipped task", "",
             f"Date {out['system']['date']}; CPU {out['system'].get('cpu')}; 1 thread; "
             + ", ".join(f"{k} {v}" for k, v in out["system"]["versions"].items()), "",
             f"Command: `{out['command']}`. The demo run's {args.model} model (vit_nano_patch4_16 on UCI digits; slim: "
             f"50% of the parameters removed); top-1 on all {len(xs)} digits val images; latency at batch 1, {args.rounds} interleaved "
             "rounds. ExecuTorch on x86 is not a phone: ratios on this CPU, not phone latencies.", "",
             f"| file | runtime | top-1 % | median ms (batch 1) | CV | speedup vs {fp32_pte} | size MB | lowering s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in runs:
        rt = "ExecuTorch XNNPACK" if k.endswith(".pte") else "ORT CPU"
        low = out["lower_seconds"].get(k)
        lines.append(f"| {k} | {rt} | {top1[k]:.2f} | {med[k]:.3f} | {100 * cv[k]:.0f}% | "
                     f"{med[fp32_pte] / med[k]:.2f}x | {out['sizes'][k] / 1e6:.2f} | "
                     f"{'' if low is None else f'{low:.0f}'} |")
    lines += ["", f"torch fp32 top-1 {top1['torch fp32']:.2f}%; int8 .pte vs fp32 .pte: "
              f"{top1[int8_pte] - top1[fp32_pte]:+.2f} points, {med[fp32_pte] / med[int8_pte]:.2f}x "
              f"faster at batch 1. XNNPACK partitions: fp32 {et.delegated_subgraphs}, int8 {et.int8.delegated_subgraphs}."]
    write_json(Path(args.out) / f"executorch_int8_{s}.json", out)
    write_text(Path(args.out) / f"executorch_int8_{s}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
