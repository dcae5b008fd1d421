"""Deployment matrix (issue 20): dense vs slim on every runtime x precision this machine has.

Models:
  demo       — the shipped task: `p3b-deploy run` (offline default: vit_nano_patch4_16 adapted to
               UCI digits, once densely and once while P3B removes 50% of the parameters). Its
               dense/ and slim/ models are exported; top-1 is measured on the digits val split.
  deit_small — deit_small_patch16_224 with random weights, and the 50% P3B-shaped slim model of
               `p3b-deploy slim --preview` (residual dims pruned; residual_io auto). Top-1 means
               nothing here: agreement with the same model's fp32 ONNX Runtime output is reported.
The matrix itself is the library's (`p3b_deploy.deploy.deployment_matrix`, also `run`'s
`targets:` stage): per model the files its targets need, all through `p3b_deploy.export` and
verified against torch (fp32 ONNX, dynamic int8, static int8 QDQ calibrated on the digits training
images / on random images for deit_small, ExecuTorch .pte). Targets (`--targets`, default all):
ONNX Runtime CPU on fp32 / int8 dynamic / int8 static; OpenVINO CPU on fp32 with the f32 hint, with
the bf16 hint (opt-in; what OpenVINO does by default on bf16 CPUs) and on the static int8 file;
ExecuTorch (XNNPACK). Every cell of one batch size (both models of an arch, every target) is timed
interleaved in one loop, batch 1 and 32. Per cell: median latency, speedup vs the dense model on
ORT fp32 (same batch), top-1 / agreement / max abs logit difference vs the same model's fp32 file
on ORT, file size. A target that cannot run here (e.g. ExecuTorch outside .venv-edge) is a
skipped row with the reason.

Rerun (about 15-20 min on 2 busy cores; exports and the demo run are cached in --work-dir):
    .venv-edge/bin/python benchmarks/deploy_matrix.py --threads 2   # .venv/bin/python: ExecuTorch rows skipped
Writes benchmarks/results/deploy_matrix.{md,json,png}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from p3b_deploy.deploy import MatrixReport, deployment_matrix, plot_reports
from p3b_deploy.targets import TARGETS
from p3b_deploy.bench.sysinfo import apply_threads
from p3b_deploy.io import write_json, write_text

VERSION = 2  # bump to invalidate cached exports (files live in WORK_DIR/<arch>-v<VERSION>/)


# --------------------------------------------------------------------------------------------
# Models
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


# --------------------------------------------------------------------------------------------
# Rendering (the library renders one matrix; this file puts the archs side by side)
# --------------------------------------------------------------------------------------------
def to_markdown(res: dict) -> str:
    reps = {a: MatrixReport.from_dict(v["matrix"]) for a, v in res["archs"].items()}
    lines = ["# Deployment matrix: dense vs slim, runtime x precision x batch", "",
             f"Command: `{res['command']}`", "",
             "The machine was shared with other agents' jobs while this ran: absolute times are noisy; every "
             "ratio comes from one interleaved loop per arch and batch size (both models, every target).",
             "deit_small has random weights: its agreement column is the share of 64 random images whose top-1 "
             "survives quantization on a model with near-uniform logits, not an accuracy; only the demo's top-1 "
             "(digits val, 359 images) is.", ""]
    for arch, rep in reps.items():
        lines += [f"## {arch}: {res['archs'][arch]['name']}", "", rep.to_markdown(title=None)]
    lines += ["## Goal (issue 20)", ""]
    lines += [f"- {arch}, {line[2:]}" for arch, rep in reps.items() for line in rep.best_lines()]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plot_reports({a: MatrixReport.from_dict(v["matrix"]) for a, v in res["archs"].items()}, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="demo,deit_small")
    p.add_argument("--targets", default=",".join(TARGETS), help="deployment targets (p3b_deploy.targets.TARGETS)")
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
    out = Path(args.out)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        write_text(out / "deploy_matrix.md", to_markdown(res))
        plot(res, out / "deploy_matrix.png")
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    apply_threads(args.threads)
    builders = {"demo": lambda: demo_models(Path(args.demo_run) if args.demo_run else work / "demo-run"),
                "deit_small": lambda: deit_models(args.level, args.seed)}
    res = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "archs": {}}
    for arch in args.archs.split(","):
        spec = builders[arch]()
        t0 = time.time()
        rep = deployment_matrix(spec["models"], args.targets, [int(b) for b in args.batches.split(",")],
                                val=spec["val"], calibration=spec["calib"], threads=args.threads,
                                input_size=spec["input"], work_dir=work / f"{arch}-v{VERSION}",
                                min_seconds=args.min_seconds, reuse=True,
                                progress=lambda s, a=arch: print(f"  {a}: {s}", flush=True))
        print(f"  {arch}: matrix in {time.time() - t0:.0f}s", flush=True)
        res["archs"][arch] = {"name": spec["name"], "matrix": rep.to_dict()}
    write_json(out / "deploy_matrix.json", res)
    write_text(out / "deploy_matrix.md", to_markdown(res))
    plot(res, out / "deploy_matrix.png")
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
