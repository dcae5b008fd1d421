"""Deployment matrix (issue 20): dense vs slim on every runtime x precision this machine has.

Models:
  demo       — the shipped task: `p3b-deploy run` (offline default: vit_nano_patch4_16 adapted to
               UCI digits, once densely and once while P3B removes 50% of the parameters). Its
               dense/ and slim/ models are exported; top-1 is measured on the digits val split.
  deit_small — deit_small_patch16_224 with random weights, and the 50% P3B-shaped slim model of
               `p3b-deploy slim --preview` (residual dims pruned; residual_io auto). Top-1 means
               nothing here: agreement with the same model's fp32 ONNX Runtime output is reported.
Files per model (all through `p3b_deploy.export`, verified against torch): fp32 ONNX, dynamic
int8 (`--int8`, MatMul weights) and static int8 QDQ (`--int8 static`, calibrated on the digits
training images / on random images for deit_small).
Cells: ONNX Runtime CPU on fp32 / int8 dynamic / int8 static; OpenVINO CPU on fp32 with the f32
hint, on fp32 with the bf16 hint (opt-in; what OpenVINO does by default on bf16 CPUs), and on the
static int8 file. Every cell of one batch size (both models, every runtime and precision) is
timed interleaved in one loop (`p3b_deploy.bench.runner.measure_cells`), batch 1 and 32.
Per cell: median latency, speedup vs the dense model on ORT fp32 (same batch), top-1 / agreement
/ max abs logit difference vs the same model's fp32 file on ORT, file size.
ExecuTorch is not measured (see the result file for the reason).

Rerun (about 15-20 min on 2 busy cores; exports and the demo run are cached in --work-dir):
    .venv/bin/python benchmarks/deploy_matrix.py --threads 2
Writes benchmarks/results/deploy_matrix.{md,json,png}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

from p3b_deploy.bench.backends import create_backend
from p3b_deploy.bench.models import resolve
from p3b_deploy.bench.runner import BenchConfig, measure_cells
from p3b_deploy.bench.sysinfo import apply_threads, system_info
from p3b_deploy.io import write_json, write_text

VERSION = 1  # bump to invalidate cached exports
# cell: (label, file variant, backend, requested precision)
CELLS = (("ORT fp32", "fp32", "ort-cpu", "fp32"),
         ("ORT int8 dynamic", "int8-dynamic", "ort-cpu", "fp32"),
         ("ORT int8 static (QDQ)", "int8-static", "ort-cpu", "fp32"),
         ("OpenVINO fp32 (f32 hint)", "fp32", "openvino", "fp32"),
         ("OpenVINO bf16 (opt-in)", "fp32", "openvino", "bf16"),
         ("OpenVINO int8 static (QDQ)", "int8-static", "openvino", "fp32"))
EXECUTORCH = ("not in this matrix. executorch 1.5.1 runs next to this torch (scripts/setup_edge.sh) and lowers "
              "and runs slim models at any batch size since slim attention stopped using split (slow test "
              "tests/surgery/test_executorch.py), but no `executorch` bench backend or export target exists yet; "
              "XNNPACK lowering of the demo slim model took 122 s here. ExecuTorch on x86 is not a phone")


# --------------------------------------------------------------------------------------------
# Models and files
# --------------------------------------------------------------------------------------------
def demo_models(run: Path) -> dict:
    """The dense and the (fine-tuned) slim model of the offline default run (run here unless
    `run` already holds one), with digits val/train images."""
    from p3b_deploy.artifacts import run_dir, slim_dir
    from p3b_deploy.export.exporter import real_images
    from p3b_deploy.pipeline import RunConfig, run_pipeline
    if not (run / "summary.json").is_file():
        t0 = time.time()
        run_pipeline(RunConfig(out=str(run)))
        print(f"  demo run in {time.time() - t0:.0f}s", flush=True)
    dense = run_dir(run / "dense_run").load_dense().eval()
    slim = slim_dir(run / "slim_ft" if (run / "slim_ft").is_dir() else run / "slim").load()
    x, y, _, calib = real_images("digits", slim, 100000, calibration=256)
    return {"models": {"dense": dense, "slim": slim}, "val": (x, y), "calib": calib, "input": (3, 16, 16),
            "name": "vit_nano_patch4_16 (shipped demo, digits)"}


def deit_models(level: float, seed: int) -> dict:
    from p3b_deploy.models import load_model
    from p3b_deploy.surgery.preview import preview_slim
    torch.manual_seed(seed)
    dense = load_model("deit_small_patch16_224").eval()
    slim = preview_slim(dense, level, seed=seed, residual_io="auto")
    g = torch.Generator().manual_seed(seed + 1)
    return {"models": {"dense": dense, "slim": slim}, "val": (torch.randn(64, 3, 224, 224, generator=g), None),
            "calib": torch.randn(64, 3, 224, 224, generator=g), "input": (3, 224, 224),
            "name": f"deit_small_patch16_224 (random weights; slim: slim --preview {level:g}, residual io auto)"}


def export_all(arch: str, spec: dict, work: Path) -> dict[tuple[str, str], Path]:
    """{(model, variant): file} with variant fp32 / int8-dynamic / int8-static, cached in work/."""
    from p3b_deploy.export import export_onnx, metadata_for
    files = {}
    x, y = spec["val"]
    for name, model in spec["models"].items():
        for mode in ("static", "dynamic"):
            out = work / f"{arch}-{name}-{mode}-v{VERSION}.onnx"
            int8 = out.with_name(out.stem + ".int8.onnx")
            if not int8.is_file():
                t0 = time.time()
                # deit_small has random weights: its int8 accuracy gate is meaningless, the agreement is reported
                export_onnx(model, out, input_size=spec["input"], int8=mode, verify_batches=(1, 2), profile_runs=1,
                            profile_batch=1, verify_data=x[:256] if y is not None else None,
                            verify_labels=y[:256] if y is not None else None, calibration_data=spec["calib"],
                            int8_max_drop=1.0 if y is not None else 100.0, agreement_images=64,
                            metadata=metadata_for(model, f"{arch} {name}"))
                print(f"  exported {arch} {name} + int8 {mode} in {time.time() - t0:.0f}s", flush=True)
            files[(name, "fp32")] = out if mode == "static" else files[(name, "fp32")]
            files[(name, f"int8-{mode}")] = int8
    return files


# --------------------------------------------------------------------------------------------
# Accuracy of one file on one runtime
# --------------------------------------------------------------------------------------------
def logits_on(backend: str, precision: str, path: Path, x: torch.Tensor, work: Path, threads: int) -> np.ndarray:
    """Logits of every image of x from `path` on (backend, precision), batch 32 (last batch padded)."""
    src = resolve(str(path))
    src.ensure_onnx(work)
    runner = create_backend(backend).prepare(src, 32, precision, threads, work)
    xs = x.numpy().astype(np.float32)
    out = []
    for i in range(0, len(xs), 32):
        b = xs[i:i + 32]
        pad = np.zeros((32 - len(b), *b.shape[1:]), np.float32)
        out.append(runner.infer(np.concatenate([b, pad]))[:len(b)])
    runner.close()
    return np.concatenate(out).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def matrix(archs: dict[str, dict], files: dict[str, dict], batches: list[int], cfg: BenchConfig,
           work: Path) -> list[dict]:
    rows = []
    for batch in batches:
        cells, meta = [], []
        for arch, fs in files.items():
            for name in ("dense", "slim"):
                for label, variant, backend, prec in CELLS:
                    src = resolve(str(fs[(name, variant)]), f"{arch}/{name}/{label}")
                    cells.append((src, create_backend(backend), prec))
                    meta.append({"arch": arch, "model": name, "cell": label, "variant": variant, "backend": backend,
                                 "precision": prec, "file": fs[(name, variant)]})
        print(f"batch {batch}: timing {len(cells)} cells interleaved", flush=True)
        recs, skipped = measure_cells(cells, batch, cfg, work)
        by_label = {r["model"]: r for r in recs}
        for m, (src, _, _) in zip(meta, cells):
            r = by_label.get(src.label)
            skip = next((k["reason"] for k in skipped if k["model"] == src.label), None)
            rows.append({**m, "batch": batch, "file": str(m["file"]), "size_mb": Path(m["file"]).stat().st_size / 1e6,
                         "median_ms": r and r["median_ms"], "cv": r and r["cv"], "iters": r and r["iters"],
                         "computes": r and r.get("inference_precision"), "skipped": skip})
    for r in rows:  # speedup vs the dense model on ORT fp32, same arch and batch
        base = next(b for b in rows if b["arch"] == r["arch"] and b["batch"] == r["batch"] and b["model"] == "dense"
                    and b["cell"] == "ORT fp32")
        r["speedup_vs_dense_ort_fp32"] = base["median_ms"] / r["median_ms"] if r["median_ms"] else None
    return rows


def add_accuracy(rows: list[dict], archs: dict[str, dict], work: Path, threads: int) -> None:
    cache: dict[tuple, dict] = {}
    for r in rows:
        key = (r["arch"], r["model"], r["variant"], r["backend"], r["precision"])
        if key not in cache and not r["skipped"]:
            x, y = archs[r["arch"]]["val"]
            ref_key = (r["arch"], r["model"], "fp32", "ort-cpu", "fp32")
            got = logits_on(r["backend"], r["precision"], Path(r["file"]), x, work, threads)
            ref = cache[ref_key]["logits"] if ref_key in cache else got
            cache[key] = {"logits": got, "top1": None if y is None else 100.0 * float((got.argmax(1) == y.numpy()).mean()),
                          "agreement": 100.0 * float((got.argmax(1) == ref.argmax(1)).mean()),
                          "max_abs_diff": float(np.abs(got - ref).max()), "images": len(x)}
        acc = cache.get(key, {})
        r.update({k: acc.get(k) for k in ("top1", "agreement", "max_abs_diff", "images")})


def to_markdown(res: dict) -> str:
    s = res["system"]
    lines = ["# Deployment matrix: dense vs slim, runtime x precision x batch", "",
             f"Date {s['date']}; CPU {s.get('cpu')}; {s.get('logical_cpus', '?')} logical CPUs; threads {res['threads']}; "
             + ", ".join(f"{k} {v}" for k, v in s["versions"].items()), "",
             f"Command: `{res['command']}`", "",
             "The machine was shared with other agents' jobs while this ran: absolute times are noisy; every "
             "ratio comes from one interleaved loop per batch size (all models, runtimes and precisions).",
             "deit_small has random weights: its agreement column is the share of 64 random images whose top-1 "
             "survives quantization on a model with near-uniform logits, not an accuracy; only the demo's top-1 "
             "(digits val, 359 images) is.", ""]
    for arch, a in res["archs"].items():
        lines += [f"## {arch}: {a['name']}", "",
                  "| model | runtime / precision | computes | batch | median ms | CV | speedup vs dense ORT fp32 "
                  "| top-1 % | agreement vs fp32 % | max abs diff vs fp32 | file MB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in [r for r in res["rows"] if r["arch"] == arch]:
            if r["skipped"]:
                lines.append(f"| {r['model']} | {r['cell']} | — | {r['batch']} | skipped: {r['skipped']} |||||||")
                continue
            top1 = "—" if r["top1"] is None else f"{r['top1']:.2f}"
            computes = r["computes"] or "fp32"
            computes = f"int8 QDQ, {computes} hint" if r["variant"] == "int8-static" and r["backend"] == "openvino" \
                else ("int8 " + r["variant"][5:] if r["variant"].startswith("int8") else computes)
            lines.append(
                f"| {r['model']} | {r['cell']} | {computes} | {r['batch']} | {r['median_ms']:.2f} "
                f"| {100 * r['cv']:.0f}% | {r['speedup_vs_dense_ort_fp32']:.2f}x "
                f"| {top1} | {r['agreement']:.1f} | {r['max_abs_diff']:.1e} | {r['size_mb']:.2f} |")
        lines.append("")
    lines += ["## Goal (issue 20)", "", *res["goal"], "", f"ExecuTorch: {EXECUTORCH}.", ""]
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for batch in sorted({r["batch"] for r in rows}):
            rs = [r for r in rows if r["arch"] == arch and r["batch"] == batch and r["model"] == "slim"
                  and not r["skipped"]]
            f32 = next(r for r in rs if r["cell"] == "ORT fp32")
            ok = [r for r in rs if r["top1"] is None or r["top1"] >= f32["top1"] - 1.0]
            best = max(ok, key=lambda r: r["speedup_vs_dense_ort_fp32"])
            acc = ("" if best["top1"] is None else
                   f"; top-1 {best['top1']:.2f}% vs slim fp32 {f32['top1']:.2f}% (cells more than 1 point below are excluded)")
            out.append(f"- {arch}, batch {batch}: best slim deployable = {best['cell']}, "
                       f"{best['speedup_vs_dense_ort_fp32']:.2f}x faster than dense ORT fp32 "
                       f"(agreement with slim fp32 {best['agreement']:.1f}%{acc})")
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    archs = list(res["archs"])
    batches = sorted({r["batch"] for r in res["rows"]})
    fig, axes = plt.subplots(len(archs), len(batches), figsize=(6 * len(batches), 3.8 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            rs = [r for r in res["rows"] if r["arch"] == arch and r["batch"] == b and not r["skipped"]]
            labels = [c[0] for c in CELLS]
            for k, name in enumerate(("dense", "slim")):
                v = [next((r["speedup_vs_dense_ort_fp32"] for r in rs if r["model"] == name and r["cell"] == c), 0)
                     for c in labels]
                ax.barh(np.arange(len(labels)) + 0.4 * k, v, height=0.4, label=name)
            ax.set_yticks(np.arange(len(labels)) + 0.2, labels, fontsize=7)
            ax.axvline(1.0, color="k", lw=0.5)
            ax.set_xlabel("speedup vs dense ORT fp32")
            ax.set_title(f"{arch}, batch {b}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="demo,deit_small")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--level", type=float, default=0.5, help="parameter reduction of the deit_small preview")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--work-dir", default="/tmp/p3b-deploy-matrix")
    p.add_argument("--demo-run", default=None, help="a finished `p3b-deploy run` (default: WORK_DIR/demo-run, made here)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--render", metavar="JSON", default=None, help="only re-render the .md and .png of a saved run")
    args = p.parse_args(argv)
    if args.render:
        import json
        res = json.loads(Path(args.render).read_text())
        res["executorch"] = EXECUTORCH
        write_text(Path(args.out) / "deploy_matrix.md", to_markdown(res))
        plot(res, Path(args.out) / "deploy_matrix.png")
        return 0
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    apply_threads(args.threads)
    builders = {"demo": lambda: demo_models(Path(args.demo_run) if args.demo_run else work / "demo-run"), "deit_small": lambda: deit_models(args.level, args.seed)}
    archs = {a: builders[a]() for a in args.archs.split(",")}
    files = {a: export_all(a, spec, work) for a, spec in archs.items()}
    cfg = BenchConfig(threads=args.threads, warmup_seconds=1.0, min_iters=10, min_seconds=args.min_seconds,
                      round_seconds=0.2)
    rows = matrix(archs, files, [int(b) for b in args.batches.split(",")], cfg, work)
    add_accuracy(rows, archs, work, args.threads)
    res = {"system": system_info(args.threads), "threads": args.threads, "command": " ".join(["python", *sys.argv]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "archs": {a: {"name": s["name"]} for a, s in archs.items()}, "rows": rows, "executorch": EXECUTORCH}
    res["goal"] = goal_lines(rows)
    write_json(out / "deploy_matrix.json", res)
    write_text(out / "deploy_matrix.md", to_markdown(res))
    plot(res, out / "deploy_matrix.png")
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
