"""Every GPU benchmark path on a dense and a slim model, in one go — run by benchmarks/gpu_check.sh.

Phases (each skipped with its reason, never dropped, if the time budget or the machine says no):
  1. torch CUDA fp32 and ONNX Runtime CUDA EP fp32 (I/O binding), batches 1 and 32;
  2. torch CUDA AMP fp16 and bf16;
  3. ONNX Runtime CUDA EP on the fp16 ONNX variants (p3b_deploy.export fp16);
  4. ONNX Runtime TensorRT EP fp16, then fp32 (engine builds are timed as session creation).
Models: deit_small_patch16_224 (random weights, dense) and a P3B-shaped 50% plan slimmed by surgery.
All phases are merged into one report under benchmarks/results/gpu/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _models(arch: str, level: float, work: Path):
    """Dense + slim torch modules and their fp32 / fp16 ONNX exports."""
    sys.path.insert(0, str(HERE))
    from latency_sparsity import make_plan
    from p3b_deploy.export import export_onnx, metadata_for
    from p3b_deploy.surgery.core import slim
    from p3b_deploy.models.vit import describe, load_model, nonblock_params
    dense = load_model(arch)
    spec = describe(dense)
    sm = slim(dense, make_plan("p3b", spec, nonblock_params(dense), level, seed=0), residual_io="index")
    mods = {"dense": dense, f"p3b{int(level * 100)}": sm}
    onnx32, onnx16 = {}, {}
    for name, m in mods.items():
        t0 = time.time()
        res = export_onnx(m, work / f"{name}.onnx", input_size=(spec.in_chans, *spec.img_size), fp16=True,
                          verify_batches=(1,), profile_batch=1, profile_runs=1, metadata=metadata_for(m, name))
        onnx32[name] = str(res.path)
        onnx16[name] = next((str(v.path) for v in res.variants if "fp16" in str(v.path)), None)
        print(f"exported {name} in {time.time() - t0:.0f}s", flush=True)
    return mods, onnx32, onnx16


def _phases(mods, onnx32, onnx16):
    """(title, models, backends, precision, batches) in priority order."""
    fp16_files = {k: v for k, v in onnx16.items() if v}
    return [
        ("torch CUDA fp32", mods, ["torch-cuda"], "fp32", [1, 32]),
        ("ORT CUDA fp32", onnx32, ["ort-cuda"], "fp32", [1, 32]),
        ("torch AMP fp16", mods, ["torch-cuda"], "fp16", [1, 32]),
        ("torch AMP bf16", mods, ["torch-cuda"], "bf16", [1, 32]),
        ("ORT CUDA fp16 ONNX", fp16_files, ["ort-cuda"], "fp16", [1, 32]),
        ("TensorRT fp16", onnx32, ["ort-tensorrt"], "fp16", [1, 32]),
        ("TensorRT fp32", onnx32, ["ort-tensorrt"], "fp32", [32]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "gpu"))
    p.add_argument("--work-dir", default="/tmp/p3b-gpu-check")
    p.add_argument("--arch", default="deit_small_patch16_224")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new phases after this")
    p.add_argument("--dry-run", action="store_true", help="list the phases; need no GPU")
    args = p.parse_args(argv)
    start = time.time()
    if args.dry_run:
        for title, _, backends, prec, batches in _phases({}, {}, {}):
            print(f"would run: {title}: backends {backends}, precision {prec}, batches {batches}")
        from p3b_deploy.bench import BenchReport  # noqa: F401
        from p3b_deploy.deploy import benchmark  # noqa: F401 — imports must resolve
        return 0
    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "this check needs a GPU", file=sys.stderr)
        return 1
    from p3b_deploy.deploy import benchmark
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    mods, onnx32, onnx16 = _models(args.arch, 0.5, work)
    merged, pending = None, []
    for title, models, backends, prec, batches in _phases(mods, onnx32, onnx16):
        left = args.budget_s - (time.time() - start)
        if left < 30 or not models:
            reason = f"time budget spent ({left:.0f}s left)" if left < 30 else "no fp16 ONNX variant was exported"
            skips = [{"model": m, "backend": b, "batch": None, "reason": f"{title}: {reason}"}
                     for m in (models or mods) for b in backends]
            pending += skips
            continue
        print(f"== {title} ({left:.0f}s left)", flush=True)
        rep = benchmark(models, backends=backends, batches=batches, precision=prec, warmup_seconds=0.5,
                        warmup_iters=3, min_iters=20, min_seconds=1.0, work_dir=work / "harness")
        print(rep.to_markdown(), flush=True)
        if merged is None:
            merged = rep
            merged.config = {"phases": [dict(rep.config, title=title)]}
        else:
            merged.results += rep.results
            merged.skipped += rep.skipped
            merged.config["phases"].append(dict(rep.config, title=title))
    if merged is None:
        print("error: no phase ran", file=sys.stderr)
        return 1
    merged.skipped += pending
    merged.config["total_s"] = round(time.time() - start, 1)
    merged.save(args.out)
    print(f"gpu check done in {time.time() - start:.0f}s; report in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
