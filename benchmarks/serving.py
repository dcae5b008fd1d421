"""Serving benchmark: slim vs dense through a real Triton server on CPU (python backend, gRPC).

For the demo model (vit_nano_patch4_16 with the shipped demo weights) and deit_small_patch16_224
(random weights): the dense model and a slim one at ~50% parameter reduction by a P3B-shaped plan
without residual pruning (the `p3b-bneck` shape of latency_sparsity.py: non-uniform per-block
head_dim / MLP hidden keep ratios; `p3b_deploy.surgery.preview.preview_plan(..., residual=False)`), exported and verified with `p3b_deploy.export`, served side by
side from one repository by `p3b_deploy.serve.serve_check` (which also checks parity through the
server), then timed with batch-1 requests at concurrency 1, 4 and 16, dense and slim interleaved.

Rerun (a few minutes on 2 cores; exports are cached in --work-dir; needs `bash scripts/setup.sh --serve`):
    .venv/bin/python benchmarks/serving.py
Writes benchmarks/results/serving.{md,json} (+ serving/<arch>/report.{json,md,csv} and latency.png).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from p3b_deploy.io import write_json, write_text

ARCHS = {  # label -> (timm name, checkpoint, input size)
    "demo": ("vit_nano_patch4_16", "demo", (3, 16, 16)),
    "deit_small": ("deit_small_patch16_224", None, (3, 224, 224)),
}
VERSION = 1  # bump to invalidate cached exports


def build(label: str, level: float, seed: int, work: Path) -> dict[str, str]:
    """{"dense": onnx, "slim": onnx} for one arch, exported once and cached in `work`."""
    from p3b_deploy.export import export_onnx, metadata_for
    from p3b_deploy.models.demo import demo_checkpoint_path
    from p3b_deploy.surgery import slim
    from p3b_deploy.surgery.preview import preview_plan
    from p3b_deploy.models import describe, load_model, nonblock_params
    name, ckpt, size = ARCHS[label]
    paths = {k: work / f"{label}-{k}{int(level * 100)}-s{seed}-v{VERSION}.onnx" for k in ("dense", "slim")}
    if all(p.is_file() for p in paths.values()):
        return {k: str(p) for k, p in paths.items()}
    dense = load_model(name, checkpoint=str(demo_checkpoint_path()) if ckpt == "demo" else ckpt).eval()
    spec = describe(dense)
    plan = preview_plan(spec, nonblock_params(dense), level, seed, residual=False)
    models = {"dense": dense, "slim": slim(dense, plan, residual_io="index")}
    for k, m in models.items():
        t0 = time.time()
        export_onnx(m, paths[k], input_size=size, verify_batches=(1,), profile_batch=1, profile_runs=1,
                    metadata=metadata_for(m, f"{name} {k}"))
        print(f"  exported {label} {k} in {time.time() - t0:.0f}s", flush=True)
    return {k: str(p) for k, p in paths.items()}


def table(rows: list[dict]) -> str:
    md = ["| model | concurrency | dense img/s | slim img/s | throughput ratio | dense p99 ms | slim p99 ms "
          "| p99 ratio | server batch (dense / slim) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['arch']} | {r['concurrency']} | {r['dense_img_s']:.1f} | {r['slim_img_s']:.1f} "
                  f"| {r['throughput_ratio']:.2f}x | {r['dense_p99_ms']:.2f} | {r['slim_p99_ms']:.2f} "
                  f"| {r['p99_ratio']:.2f}x | {r['dense_server_batch']:.2f} / {r['slim_server_batch']:.2f} |")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    from p3b_deploy.serve import serve_check
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    p.add_argument("--level", type=float, default=0.5, help="parameter reduction of the slim model (default 0.5)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max-seconds", type=float, default=4.0, help="timed seconds per model and level, at most")
    p.add_argument("--max-requests", type=int, default=3000, help="timed requests per model and level, at most")
    p.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per served model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/p3b-serving", help="ONNX export cache and server repositories")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    command = " ".join(["benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    rows, checks, system = [], {}, None
    load = [round(os.getloadavg()[0], 1)]  # other jobs on the machine: recorded, not controlled
    for label in args.archs.split(","):
        print(f"{label}: building + exporting", flush=True)
        files = build(label, args.level, args.seed, work)
        print(f"{label}: serving dense + slim, concurrency {list(levels)}", flush=True)
        check = serve_check(files, work / f"serve-{label}", concurrency=levels, max_seconds=args.max_seconds,
                            max_requests=args.max_requests, max_queue_delay_us=1000,
                            intra_op_threads=args.intra_op_threads)
        rep = check.report
        rep.config["command"] = command
        rep.save(out / "serving" / label)
        system = rep.system
        checks[label] = {**check.to_dict(), "report_dir": f"serving/{label}",
                         "models": {m["label"]: {k: m[k] for k in ("macs", "params")} for m in rep.models}}
        by = {(r["model"], r["concurrency"]): r for r in rep.results}
        for c in levels:
            d, s = by[("dense", c)], by[("slim", c)]
            rows.append({"arch": label, "concurrency": c, "dense_img_s": d["throughput"], "slim_img_s": s["throughput"],
                         "throughput_ratio": s["throughput"] / d["throughput"], "dense_p99_ms": d["p99_ms"],
                         "slim_p99_ms": s["p99_ms"], "p99_ratio": d["p99_ms"] / s["p99_ms"],
                         "dense_server_batch": d["server_batch"] or 1.0, "slim_server_batch": s["server_batch"] or 1.0,
                         "mac_reduction": s["mac_reduction"]})
        print(rep.to_markdown(), flush=True)
        load.append(round(os.getloadavg()[0], 1))
    write_json(out / "serving.json", {"command": command, "system": system, "load_average_1min": load,
                                      "rows": rows, "checks": checks})
    v = system["versions"]
    macs = "; ".join(f"{a}: slim {c['models']['slim']['macs'] / 1e6:.1f} M MACs vs dense "
                     f"{c['models']['dense']['macs'] / 1e6:.1f} M, parity vs ONNX Runtime "
                     f"{max(c['parity'].values()):.1e}" for a, c in checks.items())
    write_text(out / "serving.md", (
        "# Serving: slim vs dense through Triton Inference Server (CPU)\n\n"
        f"{system['cpu']} ({system['cpu_count']} cores, shared), {system['date']}; Triton "
        f"{system['server'].get('version')} (tritonserver of `nvidia-pytriton` {system['server'].get('nvidia-pytriton')}, "
        f"python backend running ONNX Runtime {system['server'].get('onnxruntime')} with numpy "
        f"{system['server'].get('numpy')}, {args.intra_op_threads} intra-op thread(s) per model), "
        f"tritonclient {v.get('tritonclient', '?')}, Python {v.get('python')}. 1-minute load average before / "
        f"after each model: {' / '.join(str(x) for x in load)} (other jobs share the machine).\n"
        f"Command: `.venv/bin/python {command}`\n\n"
        f"Slim = {int(args.level * 100)}% fewer parameters by a P3B-shaped plan without residual pruning "
        f"(`p3b-bneck` in latency_sparsity.py), `residual_io=index`; {macs}.\n"
        "Batch-1 requests over gRPC, dense and slim interleaved in turns of 0.25 s, at most "
        f"{args.max_seconds:g} s / {args.max_requests} requests per model and level; dynamic batching "
        "(max_batch_size 16, 1 ms queue delay). Latency is client-side (queueing in the server included). "
        "The client threads run on the same 2 cores as the server, so absolute numbers are low; "
        "compare the ratios. Per-model reports: `serving/<model>/report.md`.\n\n"
        f"{table(rows)}\n"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
