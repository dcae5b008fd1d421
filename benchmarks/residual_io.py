"""Which exact residual-dim formulation runs fastest on ONNX Runtime CPU?

deit_small_patch16_224 shapes (random weights). Plans: "p3b50" keeps a random 50% of the residual
dims every branch reads and writes, 50% of head_dim (q/k and v) and 50% of MLP hidden; "mild"
keeps 80% of the residual dims and the same 50% inside. Variants (surgery `residual_io`):
  index   - Gather reads, index_add writes (ScatterND with Transposes around it)
  scatter - Gather reads, scatter_add writes (ScatterElements(add) on the last axis)
  pad_in  - zero-padded full-D input weights (no read op), index_add writes
  pad_out - Gather reads, zero-padded full-D output weights (no write op)
  dense   - zero-padded full-D input and output weights, no index ops
  auto    - per branch "index" or "dense" by surgery.auto_io's cost rule
All are exported with torch's dynamo exporter (opset 18), checked against torch in ORT, and timed
interleaved round by round against the dense model on ORT CPU.

    python benchmarks/residual_io.py [--out benchmarks/results/residual_io.md] [--runs 20]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from p3b_deploy.onnx_io import load_onnx_session
from p3b_deploy.plan import AttnPlan, LayerPlan, MlpPlan, Plan
from p3b_deploy.surgery.core import slim
from p3b_deploy.models.vit import describe, load_model


def keep(rng: random.Random, n: int, frac: float) -> list[int] | None:
    k = round(n * frac)
    return None if k == n else sorted(rng.sample(range(n), k))


def make_plan(spec, res_keep: float, inner_keep: float = 0.5, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    D, hd, hid = spec.embed_dim, spec.head_dim, spec.mlp_hidden
    layers = []
    for _ in range(spec.depth):
        r = lambda: keep(rng, D, res_keep)  # noqa: E731
        layers.append(LayerPlan(attn=AttnPlan(in_=r(), qk=keep(rng, hd, inner_keep), v=keep(rng, hd, inner_keep),
                                              out=r()),
                                mlp=MlpPlan(in_=r(), hidden=keep(rng, hid, inner_keep), out=r())))
    plan = Plan.dense(spec)
    plan.layers = layers
    plan.validate(spec)
    return plan


def export(model: torch.nn.Module, path: Path, size) -> dict[str, int]:
    """Dynamo export with a symbolic batch; returns the graph's op counts; checks ORT vs torch."""
    x = torch.randn(2, *size)
    prog = torch.onnx.export(model.eval(), (x,), dynamo=True, opset_version=18, input_names=["images"],
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    prog.save(str(path))
    sess = load_onnx_session(path, threads=1)[0]
    with torch.no_grad():
        want = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    err = float(np.abs(got - want).max())
    if err > 1e-4 * max(1.0, float(np.abs(want).max())):
        raise SystemExit(f"{path.name}: ORT differs from torch by {err}")
    return dict(collections.Counter(n.op_type for n in prog.model_proto.graph.node))


def time_interleaved(sessions: dict, batch: int, runs: int, size) -> dict[str, list[float]]:
    x = np.random.default_rng(0).standard_normal((batch, *size), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(2):
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
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--plans", nargs="+", default=["p3b50:0.5", "mild:0.8"], help="name:residual keep")
    ap.add_argument("--variants", nargs="+", default=["index", "scatter", "pad_in", "dense", "auto"])
    ap.add_argument("--out", default="benchmarks/results/residual_io.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = load_model(args.model)
    spec = describe(dense)
    size = (3, *spec.img_size)
    tmp = Path(tempfile.mkdtemp(prefix="residual_io."))
    paths, info = {"dense": tmp / "dense.onnx"}, {}
    ops = export(dense, paths["dense"], size)
    info["dense"] = (sum(p.numel() for p in dense.parameters()), None, ops, "-")
    for pl in args.plans:
        name, frac = pl.split(":")
        plan = make_plan(spec, float(frac))
        for v in args.variants:
            t = time.perf_counter()
            m = slim(dense, plan, residual_io=v)
            cfg = m.p3b_slim_config
            k = f"{name}/{v}"
            paths[k] = tmp / f"{name}_{v}.onnx"
            ops = export(m, paths[k], size)
            chosen = dict(collections.Counter(cfg.residual_io))
            info[k] = (cfg.params["slim"], cfg.macs["dense"] / cfg.macs["slim"], ops, chosen)
            print(f"exported {k} in {time.perf_counter() - t:.0f}s ops={ops}", file=sys.stderr)
    rows = []
    for b in args.batches:
        sessions = {k: load_onnx_session(p, threads=args.threads)[0] for k, p in paths.items()}
        times = time_interleaved(sessions, b, args.runs, size)
        base = statistics.median(times["dense"])
        for k in paths:
            med = statistics.median(times[k])
            params, red, ops, chosen = info[k]
            idx = {o: ops.get(o, 0) for o in ("Gather", "ScatterND", "ScatterElements", "Transpose")}
            eff = "-" if red is None else f"{base / med / red:.2f}"
            rows.append(f"| {k} | {b} | {params / 1e6:.2f} | {'1.00' if red is None else f'{red:.2f}'}x | "
                        f"{1e3 * med:.1f} | {base / med:.2f}x | {eff} | "
                        f"{' '.join(f'{o}:{n}' for o, n in idx.items())} | {chosen} |")
            print(rows[-1], file=sys.stderr)
    import onnxruntime
    head = [
        f"# Residual-dim formulations on ONNX Runtime CPU ({args.model}, random weights)",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}; load average at end {os.getloadavg()[0]:.1f} (shared machine: absolute ms "
        "are indicative, ratios come from interleaved rounds)",
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, ORT threads {args.threads}, "
        f"{args.runs} interleaved rounds after 2 warm-ups; dynamo exporter, opset 18",
        f"- command: `python benchmarks/residual_io.py --runs {args.runs} --batches "
        f"{' '.join(map(str, args.batches))} --plans {' '.join(args.plans)} --variants {' '.join(args.variants)}`",
        "- plans: name:fraction of residual dims each branch reads and writes (random per branch); "
        "50% of head_dim (q/k, v) and MLP hidden kept in all",
        "- MAC red. = MACs saving the plan promises (padded modes compute more than that); "
        "efficiency = speed-up / MAC red.; ops = count of index-like ONNX nodes",
        "",
        "| plan/variant | batch | params (M) | MAC red. | median ms | speed-up | efficiency | ops | realised io |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
