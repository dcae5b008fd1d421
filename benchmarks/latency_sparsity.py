"""Latency vs sparsity on ONNX Runtime CPU: does a slim model's latency follow its MAC savings?

For deit_tiny/deit_small (random weights) at 0/30/50/70% parameter reduction, three models of the
same parameter count are built and timed against the dense one, interleaved, at batch 1 and 32:
  p3b  — P3B-shaped plan: non-uniform per-block keep ratios (smooth random profile averaging the
         target), each branch also reads/writes only part of the residual (random kept indices),
         through `p3b_deploy.surgery.slim` (residual_io="index") and `p3b_deploy.export`;
  p3b-auto — the same plan, slimmed with residual_io="auto" (per branch: gather/index_add, or
         zero-padded weights where that is cheaper; padded branches compute more than the plan's MACs);
  p3b-bneck — P3B-shaped plan without residual pruning (`p3b-deploy prune --no-prune-residual`):
         the same kind of non-uniform per-block profile on head_dim and MLP hidden only;
  bneck — bottleneck-only plan: uniform MLP hidden + head_dim pruning, residual in/out all kept;
  tp   — Torch-Pruning uniform pruning of the dense timm model (MetaPruner, magnitude importance;
         prunes the embed dim too), not through our plan/surgery.
Goal (issue #6): speedup efficiency (speedup / MAC reduction) >= 0.85 at batch 32, >= 0.7 at batch 1.

Rerun (about 15-25 min on 2 busy cores; ONNX exports are cached in --work-dir):
    .venv/bin/python benchmarks/latency_sparsity.py --threads 2
Writes benchmarks/results/latency_sparsity.{json,md,png} (+ the per-arch bench reports).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from p3b_deploy.deploy import benchmark
from p3b_deploy.io import write_json, write_text
from p3b_deploy.plan import AttnPlan, MlpPlan, Plan
from p3b_deploy.surgery.preview import preview_plan
from p3b_deploy.models.vit import describe, load_model, nonblock_params

ARCHS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
LEVELS = (0.3, 0.5, 0.7)
SHAPES = ("p3b", "p3b-auto", "p3b-bneck", "bneck", "tp")
# shapes built by our surgery: shape -> (plan shape made by make_plan, slim residual_io)
SLIM = {"p3b": ("p3b", "index"), "p3b-auto": ("p3b", "auto"), "p3b-bneck": ("p3b-bneck", "index"),
        "bneck": ("bneck", "index")}
GOAL = {1: 0.7, 32: 0.85}
VERSION = 1  # bump to invalidate cached exports


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------
def _pick(rng: random.Random, n: int, frac: float) -> list[int] | None:
    k = max(1, min(n, round(n * frac)))
    return None if k == n else sorted(rng.sample(range(n), k))


def _bneck_plan(spec, frac: float, seed: int) -> Plan:
    rng = random.Random(seed)
    plan = Plan.dense(spec)
    for lp in plan.layers:
        q = _pick(rng, spec.head_dim, frac)
        lp.attn = AttnPlan(qk=q, v=q)
        lp.mlp = MlpPlan(hidden=_pick(rng, spec.mlp_hidden, frac))
    return plan


def _solve(make, target: int, count) -> tuple[float, object]:
    """Bisection on a scalar s in (0, 1] so that count(make(s)) ~= target (counts grow with s)."""
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(30):
        s = (lo + hi) / 2
        obj = make(s)
        n = count(obj)
        best = (s, obj) if best is None or abs(n - target) < abs(count(best[1]) - target) else best
        if abs(n - target) / target < 0.002:
            break
        lo, hi = (s, hi) if n < target else (lo, s)
    return best


def make_plan(shape: str, spec, other: int, level: float, seed: int) -> Plan:
    dense = count_model_spec(spec, other)
    target = round((1 - level) * dense)
    cnt = lambda p: p.counts(spec, other).params  # noqa: E731
    if shape == "bneck":
        return _solve(lambda s: _bneck_plan(spec, s, seed), target, cnt)[1]
    return preview_plan(spec, other, level, seed, residual=shape != "p3b-bneck")  # the library's P3B shape


def count_model_spec(spec, other: int) -> int:
    return Plan.dense(spec).counts(spec, other).params


# --------------------------------------------------------------------------------------------
# Torch-Pruning uniform baseline
# --------------------------------------------------------------------------------------------
def tp_prune(dense: torch.nn.Module, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp
    m = copy.deepcopy(dense).eval()
    num_heads = {blk.attn.qkv: blk.attn.num_heads for blk in m.blocks}
    pruner = tp.pruner.MetaPruner(m, torch.randn(1, 3, 224, 224), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, num_heads=num_heads, prune_head_dims=True,
                                  prune_num_heads=False, ignored_layers=[m.head])
    pruner.step()
    for blk in m.blocks:  # timm reads these in forward; Torch-Pruning leaves them stale
        a = blk.attn
        a.num_heads = pruner.num_heads[a.qkv]
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        a.attn_dim = a.num_heads * a.head_dim
    m.embed_dim = m.num_features = m.patch_embed.proj.out_channels
    return m


def tp_model(dense, level: float) -> torch.nn.Module:
    total = sum(p.numel() for p in dense.parameters())
    target = (1 - level) * total
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    r = 1 - math.sqrt(1 - level)  # matrices shrink on both sides
    for _ in range(4):  # secant-like correction: params ~ (1 - r)^2
        m = tp_prune(dense, r)
        got = numel(m)
        if abs(got - target) / target < 0.01:
            break
        r = 1 - (1 - r) * math.sqrt(target / got)
    return m


# --------------------------------------------------------------------------------------------
# Export (cached) and counting
# --------------------------------------------------------------------------------------------
def _macs_of(m) -> int:
    cfg = getattr(m, "p3b_slim_config", None)
    if cfg is not None:
        return int(cfg.macs["slim"])
    from p3b_deploy.bench.models import _flop_counter_macs
    return _flop_counter_macs(m, (3, 224, 224))


def export_cached(key: str, build, work: Path) -> str:
    path = work / f"{key}.onnx"
    if path.is_file():
        return str(path)
    m = build()
    meta = {"macs": str(_macs_of(m)), "params": str(sum(p.numel() for p in m.parameters())),
            "input_size": "[3, 224, 224]"}
    t0 = time.time()
    from p3b_deploy.export.exporter import export_onnx  # verified dynamo export, as users get it
    export_onnx(m, path, input_size=(3, 224, 224), verify_batches=(1,), profile_batch=1, profile_runs=1,
                metadata=meta)
    print(f"  exported {key} in {time.time() - t0:.0f}s", flush=True)
    return str(path)


def build_models(arch: str, seed: int, work: Path) -> dict[str, str]:
    """{label: onnx path} for dense + 3 shapes x 3 levels of one arch."""
    dense = load_model(arch)
    spec, other = describe(dense), nonblock_params(dense)
    out = {"dense": export_cached(f"{arch}-dense-v{VERSION}", lambda: dense, work)}
    from p3b_deploy.surgery.core import slim
    for level in LEVELS:
        for shape in SHAPES:
            key = f"{arch}-{shape}{int(level * 100)}-s{seed}-v{VERSION}"
            if shape == "tp":
                build = lambda lv=level: tp_model(dense, lv)  # noqa: E731
            else:
                build = lambda sh=shape, lv=level: slim(  # noqa: E731
                    dense, make_plan(SLIM[sh][0], spec, other, lv, seed), residual_io=SLIM[sh][1], verify=False)
            out[f"{shape}{int(level * 100)}"] = export_cached(key, build, work)
    return out


def profile_ops(models: dict[str, str], rep, batches: list[int], threads: int) -> dict:
    """ms per op type (ORT profiler share x measured median) of the 50% models vs dense, and of the
    70% ones at batch 1 (the hardest goal) — where time goes."""
    from p3b_deploy.export.exporter import profile_op_share
    prof = {}
    pairs = [(lb, b) for lb in ("dense", "p3b50", "p3b-auto50", "p3b-bneck50", "tp50") for b in batches]
    pairs += [(lb, min(batches)) for lb in ("p3b-bneck70", "tp70")]
    for label, b in pairs:
        share = profile_op_share(Path(models[label]), b, (3, 224, 224), runs=2 if b > 8 else 10, threads=threads)
        med = rep.result(label, "ort-cpu", b)["median_ms"]
        prof[f"{label}@{b}"] = {op: round(f * med, 3) for op, f in share.items() if f >= 0.005}
    return prof


def profile_table(reports: dict[str, dict]) -> str:
    lines = []
    for arch, rep in reports.items():
        prof = rep["config"].get("op_profile")
        if not prof:
            continue
        ops = sorted({op for v in prof.values() for op in v}, key=lambda o: -max(v.get(o, 0) for v in prof.values()))
        lines += [f"\n**{arch}: ms per op type (ORT profiler share x median latency)**\n",
                  "| model@batch | " + " | ".join(ops) + " |", "|---|" + "---:|" * len(ops)]
        lines += [f"| {k} | " + " | ".join(f"{v.get(op, 0):.2f}" for op in ops) + " |" for k, v in prof.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def summarise(reports: dict[str, dict]) -> tuple[list[dict], str]:
    rows = []
    for arch, rep in reports.items():
        for r in rep["results"]:
            if r["model"] == "dense":
                continue
            shape, level = r["model"].rstrip("0123456789"), int(r["model"][-2:])
            rows.append({"arch": arch, "shape": shape, "reduction": level, "batch": r["batch"],
                         "params": r["params"], "macs": r["macs"], "median_ms": r["median_ms"],
                         "speedup": r["speedup"], "mac_reduction": r["mac_reduction"],
                         "efficiency": r["speedup_efficiency"], "cv": r["cv"],
                         "meets_goal": r["speedup_efficiency"] >= GOAL.get(r["batch"], 0.85)})
    md = ["| arch | batch | param red. | shape | params (M) | GMACs | MAC red. | speedup | efficiency | goal |",
          "|---|---:|---:|---|---:|---:|---:|---:|---:|:-:|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["batch"], r["reduction"], SHAPES.index(r["shape"]))):
        md.append(f"| {r['arch'].split('_')[0] + '_' + r['arch'].split('_')[1]} | {r['batch']} | {r['reduction']}% "
                  f"| {r['shape']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | {r['mac_reduction']:.2f} "
                  f"| {r['speedup']:.2f} | {r['efficiency']:.2f} | {'yes' if r['meets_goal'] else 'no'} |")
    return rows, "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-op profile")
    p.add_argument("--work-dir", default="/tmp/p3b-latency-sparsity", help="ONNX export cache")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--notes", type=Path, help="markdown file appended to latency_sparsity.md (findings)")
    p.add_argument("--summarise-only", action="store_true",
                   help="measure nothing: rebuild the table, notes and plot from the saved per-arch reports")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    reports = {}
    for arch in ([] if args.summarise_only else args.archs.split(",")):
        print(f"{arch}: building + exporting", flush=True)
        models = build_models(arch, args.seed, work)
        print(f"{arch}: timing {len(models)} models, batches {batches}", flush=True)
        rep = benchmark(models, backends=["ort-cpu"], batches=batches, threads=args.threads, warmup_iters=1,
                        warmup_seconds=0.0, min_iters=args.min_iters, min_seconds=args.min_seconds)
        rep.config["command"] = " ".join(["benchmarks/latency_sparsity.py", *(argv or sys.argv[1:])])
        if args.profile:
            rep.config["op_profile"] = profile_ops(models, rep, batches, args.threads)
        rep.save(out / "latency_sparsity" / arch)
        print(rep.to_markdown(), flush=True)
    for arch in ARCHS:  # summarise every arch measured so far (archs may be run one at a time)
        f = out / "latency_sparsity" / arch / "report.json"
        if f.is_file():
            reports[arch] = json.loads(f.read_text())
    rows, table = summarise(reports)
    write_json(out / "latency_sparsity.json", {"goal": GOAL, "rows": rows, "reports": reports})
    sysinfo = reports[max(reports, key=lambda a: reports[a]["system"]["date"])]["system"]
    command = next(iter(reports.values()))["config"].get("command", "benchmarks/latency_sparsity.py")
    notes = args.notes.read_text().strip() + "\n\n" if args.notes else ""
    write_text(out / "latency_sparsity.md", f"# Latency vs sparsity, ONNX Runtime CPU\n\n"
               f"{sysinfo['cpu']}, {args.threads} threads, onnxruntime {sysinfo['versions'].get('onnxruntime')}, "
               f"{sysinfo['date']}. Command: `.venv/bin/python {command}`\n\n{notes}{table}\n"
               f"{profile_table(reports)}\n")
    _plot(rows, out / "latency_sparsity.png")
    print(table)
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from p3b_deploy.io import atomic_path
    archs, batches = sorted({r["arch"] for r in rows}), sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(archs), len(batches), figsize=(5 * len(batches), 4 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            ax.plot([1, 3.5], [1, 3.5], "k--", lw=0.8, label="speedup = MAC reduction")
            ax.plot([1, 3.5], [GOAL.get(b, .85), GOAL.get(b, .85) * 3.5], "k:", lw=0.8, label=f"goal ({GOAL.get(b)})")
            for shape, mk in zip(SHAPES, "oDvs^"):
                pts = sorted((r["mac_reduction"], r["speedup"]) for r in rows
                             if r["arch"] == arch and r["batch"] == b and r["shape"] == shape)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mk + "-", label=shape)
            ax.set_title(f"{arch}, batch {b}")
            ax.set_xlabel("MAC reduction (x)")
            ax.set_ylabel("latency speedup (x)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
