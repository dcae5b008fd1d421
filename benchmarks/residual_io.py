"""Which exact residual-dim formulation runs fastest on ONNX Runtime CPU?

deit_small_patch16_224 shapes (random weights), a plan that keeps a random 50% of the residual
dims every branch reads and writes, 50% of head_dim (q/k and v) and 50% of MLP hidden. Variants:
  dense  - the unpruned model
  index  - surgery residual_io="index": index_select reads, index_add writes (Gather / ScatterND)
  dense_io - surgery residual_io="dense": zero-padded full-D weights, no index ops
  hidden_only - the same plan without residual-dim pruning (in/out all kept): the ceiling
Each is exported with p3b_deploy.export_onnx (verified), then timed interleaved on ORT CPU with
2 threads at batch 1 and 8; the index ops' runtime share comes from ORT profiling.

    python benchmarks/residual_io.py [--out benchmarks/results/residual_io.md] [--runs 30]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from p3b_deploy.export import INDEX_OPS, export_onnx, profile_op_share
from p3b_deploy.onnx_io import load_onnx_session
from p3b_deploy.plan import AttnPlan, LayerPlan, MlpPlan, Plan
from p3b_deploy.surgery import slim
from p3b_deploy.vit import describe, load_model


def half(rng: random.Random, n: int) -> list[int]:
    return sorted(rng.sample(range(n), n // 2))


def make_plan(spec, residual: bool, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    D, hd, hid = spec.embed_dim, spec.head_dim, spec.mlp_hidden
    layers = []
    for _ in range(spec.depth):
        r = (lambda: half(rng, D)) if residual else (lambda: None)
        layers.append(LayerPlan(attn=AttnPlan(in_=r(), qk=half(rng, hd), v=half(rng, hd), out=r()),
                                mlp=MlpPlan(in_=r(), hidden=half(rng, hid), out=r())))
    plan = Plan.dense(spec)
    plan.layers = layers
    plan.validate(spec)
    return plan


def time_interleaved(sessions: dict, batch: int, runs: int, size) -> dict[str, list[float]]:
    x = np.random.default_rng(0).standard_normal((batch, *size), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {"images": x})
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"images": x})
            times[k].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default="benchmarks/results/residual_io.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = load_model(args.model)
    spec = describe(dense)
    size = (3, *spec.img_size)
    plan, plan_h = make_plan(spec, True), make_plan(spec, False)
    models = {"dense": dense, "index": slim(dense, plan, residual_io="index"),
              "dense_io": slim(dense, plan, residual_io="dense"),
              "hidden_only": slim(dense, plan_h, residual_io="index")}
    tmp = Path(tempfile.mkdtemp(prefix="residual_io."))
    paths, macs, params, share = {}, {}, {}, {}
    for k, m in models.items():
        t = time.perf_counter()
        r = export_onnx(m, tmp / f"{k}.onnx", input_size=size, profile_batch=8, profile_runs=5,
                        threads=args.threads)
        print(f"exported {k} in {time.perf_counter() - t:.0f}s, parity {r.parity.max_abs_diff:.1e}",
              file=sys.stderr)
        paths[k] = r.path
        cfg = getattr(m, "p3b_slim_config", None)
        macs[k] = cfg.macs["slim"] if cfg else plan.macs["dense"] if plan.macs else None
        params[k] = sum(p.numel() for p in m.parameters())
        share[k] = r.graph
    macs["dense"] = models["index"].p3b_slim_config.macs["dense"]
    rows = []
    for b in args.batches:
        sessions = {k: load_onnx_session(p, threads=args.threads)[0] for k, p in paths.items()}
        times = time_interleaved(sessions, b, args.runs, size)
        base = statistics.median(times["dense"])
        for k in models:
            med = statistics.median(times[k])
            prof = profile_op_share(paths[k], b, size, runs=5, threads=args.threads)
            idx = sum(prof.get(o, 0.0) for o in INDEX_OPS)
            top = ", ".join(f"{o} {100 * v:.0f}%" for o, v in list(prof.items())[:4])
            rows.append(f"| {k} | {b} | {params[k] / 1e6:.2f} | {macs['dense'] / macs[k]:.2f}x | "
                        f"{1e3 * med:.2f} | {1e3 * min(times[k]):.2f} | {base / med:.2f}x | "
                        f"{100 * idx:.1f}% | {top} |")
    import onnxruntime
    head = [
        f"# Residual-dim formulations on ONNX Runtime CPU ({args.model}, random weights)",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{platform.platform()}; shared machine (other jobs running), times are indicative, ratios interleaved",
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}, "
        f"{args.runs} interleaved runs after 3 warm-ups; exporter dynamo, opset 18",
        "- plan: every branch reads and writes a random 50% of the residual dims, keeps 50% of "
        "head_dim (q/k and v) and 50% of MLP hidden; hidden_only = same without residual pruning",
        "- speed-up = dense median / variant median; index-op share from ORT profiling at that batch",
        "",
        "| variant | batch | params (M) | plan MACs saving (dense_io computes more) | median ms | min ms | speed-up | index-op share | top ops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
