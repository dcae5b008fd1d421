"""Accuracy benchmark: P3B vs baselines when adapting a pretrained ViT to a new domain.

Source: the shipped demo checkpoint (p3b_deploy.sources.DEMO_MODEL trained on MNIST-5k, see
tools/train_source.py). Target: UCI handwritten digits (other scanner, 8x8 resolution, other
writers), fixed stratified split, resized to the model's input size. The classifier head is *re-used* (both sets have the digit
classes 0-9 in the same order); the whole network is fine-tuned.

Every method gets the same epochs, lr schedule, batch size, seeds and prune schedule
(start / sparse / final at 25% / 50% / 75% of the epochs: a warm-up long enough for the benefit
signal, and a quarter of the run fine-tuning with hard masks; the method page's 10/50/100% was
measured worse for every method here, see results/accuracy_schedule/).
Each pruned run is slimmed by the one surgery (verified against the masked model) and the slim
model is evaluated: top-1 on the digits val split, exact params of the slim model, analytic MACs.

    python benchmarks/accuracy.py --epochs 8 --seeds 0 1 2 --jobs 2

Writes benchmarks/results/accuracy.{json,md,png} (+ accuracy_runs.json with per-run details).
Finished runs are cached in --work-dir and reused when the command is repeated.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dense", "p3b", "p3b-bneck", "uniform", "uniform-bneck", "tp-taylor", "tp-magnitude")
# Benchmark labels that are a registry method plus P3BConfig overrides. "-bneck": the residual
# stream's embed dims are never pruned (P3BConfig.prune_residual False), like the TP baselines,
# which prune only head_dim and MLP hidden channels.
VARIANTS = {"p3b-bneck": ("p3b", {"prune_residual": False}), "uniform-bneck": ("uniform", {"prune_residual": False})}


@dataclass
class AccuracyBench:
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # pruning methods (registry names)
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.7])  # parameter prune ratios
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds
    epochs: float = 8.0  # fine-tuning epochs for every method
    batch_size: int = 64  # images per optimizer step
    lr: float = 5e-4  # AdamW peak lr (cosine, 1 warm-up epoch)
    probe: str = "light"  # P3B benefit probe ("light": the CPU budget; "reference": the paper's)
    start_frac: float = 0.25  # prune start (TP one-shot point) as a fraction of the epochs
    sparse_frac: float = 0.5  # end of sparsify
    final_frac: float = 0.75  # masks hard and frozen (the rest: fine-tuning with hard masks)
    jobs: int = 2  # runs in parallel, one CPU thread each
    work_dir: str = "runs/accuracy"  # run dirs (cached) — gitignored
    out: str = "benchmarks/results"  # where accuracy.{json,md,png} go


def jobs_of(b: AccuracyBench) -> list[tuple[str, float, int]]:
    """(method, prune_ratio, seed) for every run; dense once per seed (ratio 0)."""
    out = []
    for m in b.methods:
        for r in ([0.0] if m == "dense" else b.ratios):
            out += [(m, r, s) for s in b.seeds]
    return out


def run_one(b: AccuracyBench, method: str, ratio: float, seed: int) -> dict[str, Any]:
    """Fine-tune (+ prune) one model, slim it, evaluate the slim model. Cached in its run dir."""
    import torch
    torch.set_num_threads(1)
    from p3b_deploy.data import build_loaders
    from p3b_deploy.pruning import P3BConfig, prune
    from p3b_deploy.models.demo import DEMO_MODEL, demo_checkpoint_path
    from p3b_deploy.surgery.core import slim_run_dir
    from p3b_deploy.models.vit import load_model

    run_dir = ROOT / b.work_dir / DEMO_MODEL / f"{method}_r{ratio:g}_s{seed}"
    base, overrides = VARIANTS.get(method, (method, {}))
    E = b.epochs
    cfg = P3BConfig(method=base, prune_ratio=ratio if base != "dense" else 0.5, epochs=E,
                    start_epoch=b.start_frac * E, sparse_epoch=b.sparse_frac * E, final_epoch=b.final_frac * E,
                    lr=b.lr, batch_size=b.batch_size, seed=seed, probe=b.probe, progress=False, **overrides)
    done = run_dir / "bench_record.json"
    if done.is_file() and _same_config(run_dir, cfg):
        return json.loads(done.read_text())
    if run_dir.exists():  # interrupted, or made with other settings: start it again from scratch
        import shutil
        shutil.rmtree(run_dir)
    torch.manual_seed(seed)
    model = load_model(DEMO_MODEL, checkpoint=demo_checkpoint_path(), num_classes=10)
    data = build_loaders("digits", model, batch_size=b.batch_size, seed=seed)
    t0 = time.time()
    res = prune(model, data, cfg, run_dir, {"checkpoint": str(demo_checkpoint_path())})
    train_s = time.time() - t0
    slim = slim_run_dir(run_dir)  # verified equal to the hard-masked model
    top1 = _top1(slim, data.val)
    hard = [r["top1"] for r in res.metrics if r["event"] == "final_hard_masks"]
    rec = {"method": method, "prune_ratio": ratio, "seed": seed, "top1": round(top1, 4),
           "params": int(sum(p.numel() for p in slim.parameters())), "macs": int(res.plan.macs["kept"]),
           "top1_masked": hard[-1] if hard else None, "keep_ratio": res.plan.keep_ratio,
           "removed_blocks": res.plan.removed_branches,
           "train_seconds": round(train_s, 1), "dense_params": res.plan.params["dense"],
           "dense_macs": res.plan.macs["dense"]}
    done.write_text(json.dumps(rec))
    return rec


def _same_config(run_dir: Path, cfg) -> bool:
    """Whether the cached run was made with `cfg` (fields missing from an older config.json take
    their current defaults; probe settings only matter to p3b, the one method with probes)."""
    from dataclasses import asdict
    f = run_dir / "config.json"
    if not f.is_file():
        return False
    saved, want = json.loads(f.read_text())["config"], asdict(cfg)
    ignore = {"progress", "resume"} | ({"probe", "probe_lr"} if cfg.method != "p3b" else set())  # no probes
    return all(saved.get(k, v) == v for k, v in want.items() if k not in ignore)


def _top1(model, loader) -> float:
    import torch
    model.eval()
    hit = n = 0
    with torch.no_grad():
        for x, y in loader:
            hit += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    return 100.0 * hit / n


def _run_job(args: tuple) -> dict[str, Any]:
    b, method, ratio, seed = args
    t0 = time.time()
    rec = run_one(b, method, ratio, seed)
    print(f"[{time.strftime('%H:%M:%S')}] {method:>14} r={ratio:g} seed={seed}: top-1 {rec['top1']:.2f}% "
          f"params {rec['params']:,} ({time.time() - t0:.0f}s)", flush=True)
    return rec


def run_all(b: AccuracyBench) -> list[dict[str, Any]]:
    todo = [(b, m, r, s) for m, r, s in jobs_of(b)]
    if b.jobs <= 1:
        return [_run_job(j) for j in todo]
    import multiprocessing as mp
    with ProcessPoolExecutor(b.jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_run_job, todo))


# ------------------------------------------------------------------------------ reporting
def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean / std over seeds per (method, ratio)."""
    import numpy as np
    rows = []
    keys = sorted({(r["method"], r["prune_ratio"]) for r in records}, key=lambda k: (k[1], METHODS.index(k[0])
                                                                                     if k[0] in METHODS else 99, k[0]))
    for m, ratio in keys:
        rs = [r for r in records if r["method"] == m and r["prune_ratio"] == ratio]
        t = np.array([r["top1"] for r in rs])
        rows.append({"method": m, "prune_ratio": ratio, "n": len(rs), "top1_mean": float(t.mean()),
                     "top1_std": float(t.std(ddof=1)) if len(t) > 1 else 0.0,
                     "params": int(np.mean([r["params"] for r in rs])), "macs": int(np.mean([r["macs"] for r in rs])),
                     "keep_ratio": np.mean([r["keep_ratio"] for r in rs], 0).tolist() if rs[0]["keep_ratio"] else None,
                     "removed_blocks": float(np.mean([r["removed_blocks"] for r in rs])),
                     "train_seconds": float(np.mean([r["train_seconds"] for r in rs]))})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        d = dense[0]
        ax.axhspan(d["top1_mean"] - d["top1_std"], d["top1_mean"] + d["top1_std"], color="0.85")
        ax.axhline(d["top1_mean"], color="0.4", ls="--", label="dense fine-tune")
    for m in [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]:
        rs = sorted([r for r in rows if r["method"] == m], key=lambda r: r["prune_ratio"])
        ax.errorbar([100 * r["prune_ratio"] for r in rs], [r["top1_mean"] for r in rs],
                    yerr=[r["top1_std"] for r in rs], marker="o", capsize=3, label=m)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("digits val top-1 (%), mean ± std over seeds")
    from p3b_deploy.models.demo import DEMO_MODEL
    ax.set_title(f"{DEMO_MODEL}: MNIST-5k -> UCI digits")
    ax.legend(fontsize=8)
    top = max((r["prune_ratio"] for r in rows if r["method"] == "p3b"), default=None)
    for m, style in (("p3b", "-o"), ("p3b-bneck", "-D"), ("uniform", "--s"), ("tp-taylor", ":^"),
                     ("tp-magnitude", ":v")):
        r = next((r for r in rows if r["method"] == m and r["prune_ratio"] == top and r["keep_ratio"]), None)
        if r is not None:
            ax2.plot(range(len(r["keep_ratio"])), r["keep_ratio"], style, ms=3, label=m)
    n = 24
    ax2.set_xticks(range(n), [f"{k}{i}" for i in range(n // 2) for k in ("a", "m")], fontsize=7)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("block (a = attention, m = MLP)")
    ax2.set_ylabel("kept parameter fraction")
    ax2.set_title(f"final per-block keep ratio at {100 * (top or 0):.0f}% pruning (mean over seeds)")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _env() -> dict[str, str]:
    import timm
    import torch
    import torch_pruning
    from p3b_deploy import __version__
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "torch_pruning": torch_pruning.__version__,
            "p3b_deploy": __version__}


def write_markdown(b: AccuracyBench, rows, records, path: Path, command: str, wall_s: float, notes: str) -> None:
    from p3b_deploy.models.demo import demo_checkpoint_info, demo_checkpoint_path
    env, src = _env(), demo_checkpoint_info()
    from p3b_deploy.models.vit import describe, load_model
    img = describe(load_model(src["model"])).img_size
    size = f"{img[0]}x{img[1]}"
    L = [f"# Accuracy: P3B vs baselines, {src['model']} MNIST-5k -> UCI digits", "",
         f"- command: `{command}`",
         f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; this invocation {wall_s / 60:.1f} min "
         f"wall (runs finished earlier are reused from --work-dir); sum of per-run training time "
         f"{sum(r['train_seconds'] for r in records) / 60:.1f} min ({b.jobs} runs in parallel, 1 thread each)",
         f"- machine: {env['cpu']}, {env['cores']} cores (shared with other jobs while it ran); python {env['python']}, "
         f"torch {env['torch']}, timm {env['timm']}, torch-pruning {env['torch_pruning']}, p3b-deploy {env['p3b_deploy']}",
         f"- source: `{src['model']}` trained on MNIST-5k (val top-1 {src['val_top1']:.2f}%), "
         f"p3b_deploy/assets/{demo_checkpoint_path().name}; head re-used (same 10 digit classes)",
         f"- target: UCI digits (sklearn), fixed stratified split: 1437 train / 360 val images, resized from 8x8 to {size}",
         f"- schedule (all methods): {b.epochs:g} epochs, batch {b.batch_size}, AdamW lr {b.lr:g} cosine, "
         f"1 warm-up epoch, label smoothing 0.1; prune start / sparse / final at epochs "
         f"{b.start_frac * b.epochs:g} / {b.sparse_frac * b.epochs:g} / {b.final_frac * b.epochs:g}; "
         f"TP baselines prune once at the start epoch; P3B probe: `{b.probe}`",
         f"- seeds: {', '.join(map(str, b.seeds))}; top-1 of the *slim* model (after surgery) on the val split; "
         f"params exact (slim model), MACs analytic per image (incl. attention matmuls)", ""]
    L += ["| method | pruned | top-1 (%) | params | MACs (M) | removed blocks | train s/run |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['method']} | {100 * r['prune_ratio']:.0f}% | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} "
                 f"(n={r['n']}) | {r['params']:,} | {r['macs'] / 1e6:.1f} | {r['removed_blocks']:.1f} | "
                 f"{r['train_seconds']:.0f} |")
    L += ["", "## Final per-block keep ratio (params kept / dense, mean over seeds)", ""]
    for ratio in sorted({r["prune_ratio"] for r in rows if r["method"] == "p3b"}):
        prof = {r["method"]: r["keep_ratio"] for r in rows if r["prune_ratio"] == ratio and r["keep_ratio"]}
        names = [m for m in METHODS if m in prof and m != "dense"]
        L += [f"### {100 * ratio:.0f}% pruned", "", "| block | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
        for j in range(len(prof[names[0]])):
            blk = f"{'attn' if j % 2 == 0 else 'mlp'}{j // 2}"
            L.append(f"| {blk} | " + " | ".join(f"{prof[m][j]:.2f}" for m in names) + " |")
        L.append("")
    if notes:
        L += ["## Notes", "", notes.strip(), ""]
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = AccuracyBench()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=d.methods)
    p.add_argument("--ratios", nargs="+", type=float, default=d.ratios)
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds)
    for name in ("epochs", "batch_size", "lr", "probe", "start_frac", "sparse_frac", "final_frac", "jobs",
                 "work_dir", "out"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument("--notes", type=Path, default=None, help="markdown file appended to accuracy.md as notes")
    args = vars(p.parse_args(argv))
    notes = args.pop("notes")
    b = AccuracyBench(**args)
    t0 = time.time()
    records = run_all(b)
    wall = time.time() - t0
    out = ROOT / b.out
    out.mkdir(parents=True, exist_ok=True)
    keys = ("method", "prune_ratio", "seed", "top1", "params", "macs")
    (out / "accuracy.json").write_text(json.dumps([{k: r[k] for k in keys} for r in records], indent=1) + "\n")
    (out / "accuracy_runs.json").write_text(json.dumps({"config": asdict(b), "runs": records}, indent=1) + "\n")
    rows = summarise(records)
    shown = [a for i, a in enumerate(argv) if a != "--notes" and (i == 0 or argv[i - 1] != "--notes")]
    command = "python benchmarks/accuracy.py " + shlex.join(shown)
    write_markdown(b, rows, records, out / "accuracy.md", command.strip(), wall,
                   notes.read_text() if notes else "")
    plot(rows, out / "accuracy.png")
    for r in rows:
        print(f"{r['method']:>14} {100 * r['prune_ratio']:3.0f}%  top-1 {r['top1_mean']:6.2f} ± {r['top1_std']:.2f}  "
              f"params {r['params']:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
