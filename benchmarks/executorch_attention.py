"""ExecuTorch lowering: fused (SDPA) vs unfused attention, XNNPACK fp32, dense and slim.

`p3b_deploy.executorch_io.lower` exports attention unfused. This script measures why: each model
(deit_tiny_patch16_224, random weights, and its 50% P3B-shaped slim preview) is lowered twice,
with `fused_attention=True` (torch.export decomposes SDPA into a NaN-safe softmax whose masking
ops stay on ExecuTorch's portable kernels) and False (q @ k^T -> softmax -> @ v, all XNNPACK).
Per program: XNNPACK partitions, ops left outside XNNPACK, max abs logit difference vs torch,
and median latency at batch 1 with 1 thread, all four programs timed interleaved (round robin).
ExecuTorch on x86 is not a phone: these are ratios on this CPU.

Needs .venv-edge (bash scripts/setup_edge.sh). About 5 min (four lowerings) on 2 cores:
    .venv-edge/bin/python benchmarks/executorch_attention.py
Writes benchmarks/results/executorch_attention.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from p3b_deploy.bench.sysinfo import system_info
from p3b_deploy.executorch_io import load_pte, lower, set_threads
from p3b_deploy.io import write_json, write_text
from p3b_deploy.models import load_model
from p3b_deploy.surgery.preview import preview_slim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--level", type=float, default=0.5, help="parameter reduction of the slim preview")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (one run of each program per round)")
    p.add_argument("--work-dir", default="/tmp/p3b-et-attention")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    set_threads(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dense = load_model(args.model).eval()
    models = {"dense": dense, "slim": preview_slim(dense, args.level, seed=0, residual_io="auto").eval()}
    size = tuple(int(v) for v in dense.pretrained_cfg["input_size"])
    x = np.random.default_rng(0).standard_normal((1, *size)).astype(np.float32)
    rows, progs = [], {}
    for name, model in models.items():
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for fused in (True, False):
            t0 = time.time()
            low = lower(model, size, 8, fused_attention=fused)
            path = work / f"{name}-{'fused' if fused else 'unfused'}.pte"
            path.write_bytes(low.buffer)
            prog = load_pte(path)
            key = (name, fused)
            progs[key] = prog
            rows.append({"model": name, "attention": "fused (SDPA)" if fused else "unfused", "lower_s": time.time() - t0,
                         "partitions": low.delegated_subgraphs, "portable_ops": low.portable_ops,
                         "max_abs_diff": float(np.abs(prog.forward(x) - ref).max()), "key": key})
            print(f"lowered {name} fused={fused} in {time.time() - t0:.0f}s", flush=True)
    times: dict = {k: [] for k in progs}
    for k, prog in progs.items():  # warm-up
        for _ in range(3):
            prog.forward(x)
    for _ in range(args.rounds):
        for k, prog in progs.items():
            t0 = time.perf_counter()
            prog.forward(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    for r in rows:
        t = times[r.pop("key")]
        r["median_ms"], r["cv"] = float(np.median(t)), float(np.std(t) / np.mean(t))
    for r in rows:
        fused = next(f for f in rows if f["model"] == r["model"] and f["attention"].startswith("fused"))
        r["speedup_vs_fused"] = fused["median_ms"] / r["median_ms"]
    res = {"system": system_info(1), "model": args.model, "level": args.level, "rounds": args.rounds,
           "command": " ".join(["python", *sys.argv]), "rows": rows}
    lines = ["# ExecuTorch (XNNPACK fp32): fused vs unfused attention", "",
             f"Date {res['system']['date']}; CPU {res['system'].get('cpu')}; 1 thread; "
             + ", ".join(f"{k} {v}" for k, v in res["system"]["versions"].items()), "",
             f"Command: `{res['command']}`. Model {args.model} (random weights) and its {args.level:.0%} slim preview; "
             f"batch 1, {args.rounds} interleaved rounds. ExecuTorch on x86 is not a phone.", "",
             "| model | attention | XNNPACK partitions | median ms | CV | speedup vs fused | max abs diff vs torch "
             "| ops outside XNNPACK |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ops = ", ".join(f"{k.removeprefix('aten_').removesuffix('_default')} {v}" for k, v in r["portable_ops"].items())
        lines.append(f"| {r['model']} | {r['attention']} | {r['partitions']} | {r['median_ms']:.2f} | {100 * r['cv']:.0f}% "
                     f"| {r['speedup_vs_fused']:.2f}x | {r['max_abs_diff']:.1e} | {ops} |")
    out = Path(args.out)
    write_json(out / "executorch_attention.json", res)
    write_text(out / "executorch_attention.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
