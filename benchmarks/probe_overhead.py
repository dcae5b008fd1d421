"""Probe overhead and agreement: plain fine-tuning vs P3B with reference vs light probes.

1. Training-step time (forward + backward + AdamW step, probes and gate gradients on) of the
   three variants, measured in the same process, interleaved round by round.
2. The offline demo (the shipped MNIST-5k source model on the built-in `digits` set) pruned with each probe,
   for each of --seeds: Spearman rank correlation of the final per-block keep ratios (goal of the
   last mask update and the realised plan), plus accuracy of the hard-masked models. Pairs of
   seeds of the *same* probe give the noise floor: how well one probe agrees with itself.

    python benchmarks/probe_overhead.py --seeds 0 1 2 --jobs 2 --out benchmarks/results/probe_overhead.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from p3b_deploy._version import __version__
from p3b_deploy.data import build_loaders
from p3b_deploy.io import write_text
from p3b_deploy.pruning import P3BConfig, prune
from p3b_deploy.pruning.p3b.pruner import Pruner
from p3b_deploy.train.trainer import Trainer
from p3b_deploy.models.demo import DEMO_MODEL, demo_checkpoint_path
from p3b_deploy.models.vit import describe, load_model

VARIANTS = (("plain fine-tuning", "dense", "light"), ("P3B light probe", "p3b", "light"),
            ("P3B reference probe", "p3b", "reference"))
# Demo prunes: label -> (probe kind, probe lr; None = the library default of that kind). The last
# one is the light probe at the reference probe's lr, the setting the light default was chosen against.
PROBE_RUNS = {"reference": ("reference", None), "light": ("light", None), "light @ lr 5e-4": ("light", 5e-4)}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def make_trainer(method: str, probe: str, args, tmp: str) -> Trainer:
    torch.manual_seed(0)
    model = load_model(args.model, checkpoint=args.checkpoint)
    data = build_loaders("digits", model, batch_size=args.batch_size, seed=0)
    # probes and gate gradients on from step 0, no mask update during the timing
    cfg = P3BConfig(method=method, probe=probe, epochs=100, start_epoch=0, sparse_epoch=50, final_epoch=90,
                    update_every=10**6, batch_size=args.batch_size, progress=False)
    spec = describe(model)
    factory = None if method == "dense" else (lambda m, spe: Pruner(m, spec, cfg, spe, data.num_classes))
    return Trainer(model, data, cfg, os.path.join(tmp, f"{method}-{probe}"), factory)


def time_steps(args) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(m, p, args, tmp) for name, m, p in VARIANTS}
        for tr in trainers.values():  # warm-up
            tr.train_step()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tr.train_step()
                times[name].append((time.perf_counter() - t0) / args.steps)
    return times


def demo(label: str, args, tmp: str, seed: int = 0):
    probe, probe_lr = PROBE_RUNS[label]
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    model = load_model(args.model, checkpoint=args.checkpoint)
    data = build_loaders("digits", model, batch_size=args.batch_size, seed=seed)
    e = args.demo_epochs
    cfg = P3BConfig(prune_ratio=0.5, probe=probe, epochs=e, start_epoch=0.25 * e, sparse_epoch=0.75 * e,
                    final_epoch=0.9 * e, batch_size=args.batch_size, lr=args.lr, warmup_epochs=0.1 * e,
                    progress=False, seed=seed, probe_lr=probe_lr)
    t0 = time.perf_counter()
    res = prune(model, data, cfg, os.path.join(tmp, f"{label}-s{seed}".replace(" ", "_")))
    wall = time.perf_counter() - t0
    goal = [m for m in res.metrics if m["event"] == "mask_update"][-1]["kr_goal"]
    hard = [m for m in res.metrics if m["event"] == "final_hard_masks"][-1]
    return {"goal": goal, "kr": res.plan.keep_ratio, "top1": hard["top1"], "wall": wall,
            "kept": res.plan.params["kept"], "dense": res.plan.params["dense"], "probe": label, "seed": seed,
            "probe_lr": cfg.probe_lr_value}


def _demo_job(a) -> dict:
    return demo(*a)


def demos(args, tmp: str) -> dict[tuple[str, int], dict]:
    """{(probe, seed): demo result}, `args.jobs` prunes at a time (one thread each)."""
    todo = [(p, args, tmp, s) for s in args.seeds for p in PROBE_RUNS]
    if args.jobs <= 1:
        res = [_demo_job(a) for a in todo]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            res = list(ex.map(_demo_job, todo))
    return {(r["probe"], r["seed"]): r for r in res}


def seed_mean(runs: dict[tuple[str, int], dict], probe: str, key: str) -> list[float]:
    """Per-block mean over seeds of `key` (goal / kr) for one probe."""
    seeds = sorted({s for _, s in runs})
    return [statistics.fmean(v) for v in zip(*(runs[probe, s][key] for s in seeds))]


def _relative(path: str) -> str:
    """A path as written in committed results: relative to the repository when inside it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(repo))
    except ValueError:
        return Path(path).name


def _shown_command(argv: list[str]) -> str:
    """The command line as recorded in the report: without `--notes FILE` (notes are not inputs)."""
    keep = [a for i, a in enumerate(argv) if a != "--notes" and (i == 0 or argv[i - 1] != "--notes")]
    return "python " + " ".join(keep)


def agreement(runs: dict[tuple[str, int], dict], key: str) -> dict[str, list[float]]:
    """Spearman rho of `key` (goal / kr): each light variant vs the reference probe (same seed;
    against the reference's seed-mean vector; seed means vs seed means), and every probe against
    itself across seeds (the noise floor)."""
    import itertools
    seeds = sorted({s for _, s in runs})
    mean = lambda p: seed_mean(runs, p, key)  # noqa: E731
    ref = mean("reference")
    out: dict[str, list[float]] = {}
    for p in [p for p in PROBE_RUNS if p != "reference"]:
        out[f"{p} vs reference (same seed)"] = [spearman(runs[p, s][key], runs["reference", s][key]) for s in seeds]
        out[f"{p} vs reference seed mean"] = [spearman(runs[p, s][key], ref) for s in seeds]
        out[f"{p} seed mean vs reference seed mean"] = [spearman(mean(p), ref)]
    for p in PROBE_RUNS:
        out[f"{p} vs {p} (seed pairs)"] = [spearman(runs[p, a][key], runs[p, b][key])
                                           for a, b in itertools.combinations(seeds, 2)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--checkpoint", default="demo",
                    help="source weights; 'demo' = the shipped MNIST-5k checkpoint, 'none' = random init")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--demo-epochs", type=float, default=2.0, help="length of each demo prune")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="demo prunes per probe, one per seed")
    ap.add_argument("--jobs", type=int, default=1, help="demo prunes run in parallel")
    ap.add_argument("--out", default="benchmarks/results/probe_overhead.md")
    ap.add_argument("--notes", help="markdown file with findings, placed after the header")
    args = ap.parse_args()
    shown_weights = {"demo": "the shipped demo checkpoint (p3b_deploy/assets/vit_nano_mnist5k.safetensors)",
                     "none": "random init"}.get(args.checkpoint, _relative(args.checkpoint))
    args.checkpoint = {"demo": str(demo_checkpoint_path()), "none": None}.get(args.checkpoint, args.checkpoint)
    torch.set_num_threads(args.threads)
    times = time_steps(args)
    print({k: [round(t, 3) for t in v] for k, v in times.items()}, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = demos(args, tmp)
    base = statistics.median(times["plain fine-tuning"])
    agree = {k: agreement(runs, k) for k in ("goal", "kr")}
    lines = ["# Probe overhead and light-vs-reference agreement", "",
             f"- date: {dt.date.today().isoformat()}; machine: {platform.platform()}, {os.cpu_count()} CPU cores "
             f"(shared), {args.threads} torch thread(s), no GPU",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}, p3b-deploy {__version__}",
             f"- model {args.model} (weights: {shown_weights}), data digits (built-in), "
             f"batch {args.batch_size}",
             f"- command: `{_shown_command(sys.argv)}`", "",
             *([open(args.notes).read().strip(), ""] if args.notes else []),
             "## Training-step time (interleaved, median of rounds)", "",
             "| variant | s/step (median) | all rounds | vs plain |", "|---|---:|---|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {', '.join(f'{t:.3f}' for t in ts)} | {med / base:.2f}x |")
    lines += ["", f"## Demo prune, R = 0.5, {args.demo_epochs} epochs, seeds {', '.join(map(str, args.seeds))}", "",
              "| probe | seed | hard-mask top-1 | kept params | wall time (s) |", "|---|---:|---:|---:|---:|"]
    for (p, sd), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {p} (lr {r['probe_lr']:g}) | {sd} | {r['top1']:.2f} | {r['kept']:,} / {r['dense']:,} "
                     f"| {r['wall']:.0f} |")
    lines += [f"| {p}: mean over seeds | | {statistics.fmean(runs[p, s]['top1'] for s in args.seeds):.2f} | | |"
              for p in PROBE_RUNS]
    lines += ["", "## Spearman rank correlation of the per-block keep ratios", "",
              "goal = last mask update's goal keep ratios; plan = realised keep ratios of the hard plan. "
              "`X vs X (seed pairs)`: the same probe with two seeds, i.e. how far a probe agrees with itself.", "",
              "| comparison | goal: mean | goal: values | plan: mean | plan: values |", "|---|---:|---|---:|---|"]
    for name in agree["goal"]:
        g, k = agree["goal"][name], agree["kr"][name]
        lines.append(f"| {name} | {statistics.fmean(g):.3f} | {', '.join(f'{x:.3f}' for x in g)} | "
                     f"{statistics.fmean(k):.3f} | {', '.join(f'{x:.3f}' for x in k)} |")
    lines += ["", "## Goal keep ratios per block (mean over seeds)", "",
              "| block | " + " | ".join(PROBE_RUNS) + " |", "|---|" + "---:|" * len(PROBE_RUNS)]
    names = describe(load_model(args.model)).block_names()
    mean = {p: seed_mean(runs, p, "goal") for p in PROBE_RUNS}
    lines += [f"| {n} | " + " | ".join(f"{mean[p][i]:.3f}" for p in PROBE_RUNS) + " |" for i, n in enumerate(names)]
    import json
    write_text(args.out.rsplit(".", 1)[0] + ".json", json.dumps(
        {"times_s_per_step": times, "runs": [dict(r, probe=p, seed=s) for (p, s), r in runs.items()],
         "agreement": agree}, indent=1) + "\n")
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
