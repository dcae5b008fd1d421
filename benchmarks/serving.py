"""Serving benchmark: how much of in-process ONNX Runtime throughput survives serving through Triton.

For deit_small_patch16_224 (random weights) dense and a slim one at ~50% parameter reduction by
a P3B-shaped plan without residual pruning (`p3b_deploy.surgery.preview.preview_plan(...,
residual=False)`, the `p3b-bneck` shape of latency_sparsity.py), exported and
verified with `p3b_deploy.export`:
1. in-process ONNX Runtime, intra-op threads 1 and 2, batches 1..16, dense and slim in turns,
   once before and once after serving (their mean): the best (threads, batch) is the ceiling;
2. the same files served side by side by the bundled tritonserver (python backend, dynamic
   batching up to 16, 1 ms queue delay), parity checked through the server, then the serving
   config sweep of `bench --server --sweep` (instances x ORT threads per instance, two passes
   forward and backward) with batch-1 requests at concurrency 16, dense and slim in turns.
Serving efficiency = best served img/s / best in-process img/s (same machine, same cores; the
client threads share the cores too). Goals (issue 19): efficiency >= 0.8 for both models,
slim/dense served throughput >= 0.9 x the MAC ratio.

Rerun (~10 minutes on 2 cores; exports are cached in --work-dir; needs `bash scripts/setup.sh --serve`):
    .venv/bin/python benchmarks/serving.py
Writes benchmarks/results/serving.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from p3b_deploy.io import write_json, write_text

ARCHS = {  # label -> (timm name, checkpoint, input size)
    "demo": ("vit_nano_patch4_16", "demo", (3, 16, 16)),
    "deit_small": ("deit_small_patch16_224", None, (3, 224, 224)),
}
VERSION = 1  # bump to invalidate cached exports


def build(label: str, level: float, seed: int, work: Path) -> dict[str, str]:
    """{"dense": onnx, "slim": onnx} for one arch, exported once and cached in `work`."""
    import torch

    from p3b_deploy.export import export_onnx, metadata_for
    from p3b_deploy.models import describe, load_model, nonblock_params
    from p3b_deploy.models.demo import demo_checkpoint_path
    from p3b_deploy.surgery import slim
    from p3b_deploy.surgery.preview import preview_plan
    name, ckpt, size = ARCHS[label]
    paths = {k: work / f"{label}-{k}{int(level * 100)}-s{seed}-v{VERSION}.onnx" for k in ("dense", "slim")}
    if all(p.is_file() for p in paths.values()):
        return {k: str(p) for k, p in paths.items()}
    torch.set_num_threads(os.cpu_count() or 1)
    dense = load_model(name, checkpoint=str(demo_checkpoint_path()) if ckpt == "demo" else ckpt).eval()
    plan = preview_plan(describe(dense), nonblock_params(dense), level, seed, residual=False)
    models = {"dense": dense, "slim": slim(dense, plan, residual_io="index")}
    for k, m in models.items():
        t0 = time.time()
        export_onnx(m, paths[k], input_size=size, verify_batches=(1,), profile_batch=1, profile_runs=1,
                    metadata=metadata_for(m, f"{name} {k}"))
        print(f"  exported {label} {k} in {time.time() - t0:.0f}s", flush=True)
    return {k: str(p) for k, p in paths.items()}


def in_process(files: dict[str, str], batches: list[int], threads: list[int], seconds: float,
               turns: int) -> list[dict]:
    """Images/s of ONNX Runtime in this process, per model, intra-op threads and batch: models in
    turns of seconds/turns each, the order alternating, so drift hits both alike."""
    import numpy as np

    from p3b_deploy.onnx_io import load_onnx_session
    rows = []
    for t in threads:
        sessions = {m: load_onnx_session(p, threads=t)[0] for m, p in files.items()}
        for b in batches:
            done = {m: [0, 0.0] for m in files}  # images, seconds
            feeds = {}
            for m, s in sessions.items():
                inp = s.get_inputs()[0]
                feeds[m] = (inp.name, np.random.default_rng(b).standard_normal((b, *inp.shape[1:])).astype(np.float32))
                s.run(None, {feeds[m][0]: feeds[m][1]})  # warm-up
            order = list(files)
            for _ in range(turns):
                for m in order:
                    name, x = feeds[m]
                    t0 = time.perf_counter()
                    while True:
                        sessions[m].run(None, {name: x})
                        done[m][0] += b
                        if time.perf_counter() - t0 >= seconds / turns:
                            break
                    done[m][1] += time.perf_counter() - t0
                order.reverse()
            for m, (images, secs) in done.items():
                rows.append({"model": m, "batch": b, "threads": t, "img_s": images / secs, "images": images,
                             "seconds": secs})
            print(f"  in-process threads {t} batch {b}", {m: round(i / s_, 2) for m, (i, s_) in done.items()},
                  flush=True)
    return rows


def bracket(before: list[dict], after: list[dict]) -> list[dict]:
    """In-process rows measured before and after serving, merged: img/s = their mean."""
    out = []
    for a, b in zip(before, after):
        assert (a["model"], a["batch"], a["threads"]) == (b["model"], b["batch"], b["threads"])
        out.append({**a, "img_s": (a["img_s"] + b["img_s"]) / 2, "img_s_before": a["img_s"], "img_s_after": b["img_s"]})
    return out


def served(files: dict[str, str], work: Path, args) -> tuple[dict, object]:
    """Parity through the server, then the config sweep at the given concurrency."""
    from p3b_deploy.export.triton import config_from_onnx, write_triton_repo
    from p3b_deploy.onnx_io import load_onnx_session
    from p3b_deploy.serve import TritonServer, infer
    from p3b_deploy.serve.tune import sweep
    import numpy as np
    repo = work / "serving-repo"
    for name, path in files.items():
        write_triton_repo(path, repo, config_from_onnx(path, name, backend="python", max_batch_size=16,
                                                       max_queue_delay_us=1000, intra_op_threads=1))
    parity = {}
    with TritonServer(repo, model_control="explicit", log_path=work / "tritonserver.log") as server:
        for name, path in files.items():
            sess = load_onnx_session(path, threads=1)[0]
            inp = sess.get_inputs()[0]
            x = np.random.default_rng(0).standard_normal((2, *inp.shape[1:])).astype(np.float32)
            parity[name] = float(np.abs(infer(server.grpc_address, name, x) - sess.run(None, {inp.name: x})[0]).max())
        result = sweep(server.grpc_address, list(files), {"instances": args.instances, "threads": args.threads},
                       p99_bound_ms=args.p99_ms, passes=2, progress=lambda m: print("  " + m, flush=True),
                       concurrency=(args.concurrency,), batch=1, max_seconds=args.max_seconds,
                       max_requests=args.max_requests, round_seconds=1.0, warmup_requests=1)
        runtime = {"tritonserver": "2.51 (nvidia-pytriton wheel)", **server.runtime.versions()}
    return {"parity": parity, "runtime": runtime}, result


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="deit_small", choices=list(ARCHS))
    p.add_argument("--level", type=float, default=0.5, help="parameter reduction of the slim model (default 0.5)")
    p.add_argument("--batches", type=ints, default=(1, 4, 8, 16), help="in-process ORT batches")
    p.add_argument("--ort-seconds", type=float, default=3.0, help="in-process seconds per model, threads and batch")
    p.add_argument("--ort-threads", type=ints, default=(1, 2), help="in-process ORT intra-op threads")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight when served")
    p.add_argument("--instances", type=ints, default=(1, 2), help="sweep: model instances")
    p.add_argument("--threads", type=ints, default=(1, 2), help="sweep: ORT threads per instance")
    p.add_argument("--p99-ms", type=float, default=None, help="sweep: p99 bound for the best config")
    p.add_argument("--max-seconds", type=float, default=8.0, help="served: timed seconds per model and config")
    p.add_argument("--max-requests", type=int, default=2000, help="served: timed requests per model and config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/p3b-serving", help="ONNX export cache and server repository")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    from p3b_deploy.bench.sysinfo import system_info
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    load = [round(os.getloadavg()[0], 1)]  # other jobs on the machine: recorded, not controlled
    print(f"{args.arch}: building + exporting", flush=True)
    files = build(args.arch, args.level, args.seed, work)
    print(f"{args.arch}: in-process ONNX Runtime (before serving)", flush=True)
    before = in_process(files, list(args.batches), list(args.ort_threads), args.ort_seconds, turns=3)
    load.append(round(os.getloadavg()[0], 1))
    print(f"{args.arch}: served, sweep at concurrency {args.concurrency}", flush=True)
    info, sw = served(files, work, args)
    load.append(round(os.getloadavg()[0], 1))
    print(f"{args.arch}: in-process ONNX Runtime (after serving)", flush=True)
    ort_rows = bracket(before, in_process(files, list(args.batches), list(args.ort_threads), args.ort_seconds, turns=3))
    load.append(round(os.getloadavg()[0], 1))
    system = system_info(None)
    best_ort = {m: max((r for r in ort_rows if r["model"] == m), key=lambda r: r["img_s"]) for m in files}
    best_srv = sw.best
    macs = {r["model"]: r["macs"] for r in sw.rows}
    eff = {m: best_srv[m]["throughput"] / best_ort[m]["img_s"] if best_srv[m] else None for m in files}
    mac_ratio = macs["dense"] / macs["slim"]
    srv_ratio = best_srv["slim"]["throughput"] / best_srv["dense"]["throughput"]
    ort_ratio = best_ort["slim"]["img_s"] / best_ort["dense"]["img_s"]
    summary = {"efficiency": eff, "mac_ratio": mac_ratio, "served_ratio": srv_ratio, "in_process_ratio": ort_ratio,
               "served_ratio_over_mac_ratio": srv_ratio / mac_ratio,
               "goals": {"efficiency >= 0.8": all(e is not None and e >= 0.8 for e in eff.values()),
                         "served slim/dense >= 0.9 x MAC ratio": srv_ratio >= 0.9 * mac_ratio}}
    write_json(out / "serving.json", {"command": command, "system": system, "load_average_1min": load,
                                      "in_process": ort_rows, "sweep": sw.to_dict(), **info, "summary": summary})
    md = [
        f"# Serving efficiency: {ARCHS[args.arch][0]} dense and slim through Triton (CPU)", "",
        f"{system['cpu']} ({system['cpu_count']} cores, **shared with other agents' jobs**: 1-minute load average "
        f"{' / '.join(str(x) for x in load)} at start / after in-process / after served / after in-process again, i.e. "
        f"the machine was busy), "
        f"{system['date']}; Triton 2.51.0 (tritonserver of `nvidia-pytriton` {info['runtime'].get('nvidia-pytriton')}, "
        f"python backend running ONNX Runtime {info['runtime'].get('onnxruntime')}), in-process ONNX Runtime "
        f"{system['versions'].get('onnxruntime')}, Python {system['versions'].get('python')}.",
        f"Command: `.venv/bin/python {command}`", "",
        f"Random weights; slim = {int(args.level * 100)}% fewer parameters by a P3B-shaped plan without residual "
        f"pruning: {macs['slim'] / 1e6:.0f} M vs {macs['dense'] / 1e6:.0f} M MACs (MAC ratio {mac_ratio:.2f}x). "
        f"Parity through the server vs ONNX Runtime: {max(info['parity'].values()):.1e}.", "",
        "## Summary", "",
        "| | dense | slim | slim / dense |", "|---|---:|---:|---:|",
        f"| in-process ORT, best batch and threads | {_ort(best_ort['dense'])} | {_ort(best_ort['slim'])} "
        f"| {ort_ratio:.2f}x |",
        f"| served, concurrency {args.concurrency}, best config | {_srv(best_srv['dense'])} | {_srv(best_srv['slim'])} "
        f"| {srv_ratio:.2f}x ({srv_ratio / mac_ratio:.2f} of the MAC ratio) |",
        f"| serving efficiency (served / in-process) | {_f(eff['dense'])} | {_f(eff['slim'])} | |", "",
        f"Goals: efficiency >= 0.8 for both: **{'met' if summary['goals']['efficiency >= 0.8'] else 'not met'}**; "
        f"served slim/dense >= 0.9 x MAC ratio ({0.9 * mac_ratio:.2f}x): "
        f"**{'met' if summary['goals']['served slim/dense >= 0.9 x MAC ratio'] else 'not met'}**.", "",
        "In-process and served were measured one after the other, not interleaved: the in-process numbers "
        "are the mean of a run before and a run after serving (both columns below), which brackets the "
        "machine's drift in between; the efficiency is only as good as that bracket.", "",
        "## In-process ONNX Runtime (images/s; dense and slim in turns per batch)", "",
        "| threads | batch | dense img/s (before / after) | slim img/s (before / after) | slim / dense |",
        "|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["threads"], r["batch"]): r for r in ort_rows}
    for t in args.ort_threads:
        for b in args.batches:
            d, s = by[("dense", t, b)], by[("slim", t, b)]
            md.append(f"| {t} | {b} | {d['img_s']:.2f} ({d['img_s_before']:.2f} / {d['img_s_after']:.2f}) "
                      f"| {s['img_s']:.2f} ({s['img_s_before']:.2f} / {s['img_s_after']:.2f}) "
                      f"| {s['img_s'] / d['img_s']:.2f}x |")
    md += ["", f"## Served: config sweep (batch-1 requests, concurrency {args.concurrency}, two passes)", "",
           "Throughput is the mean of the two passes (forward and backward through the grid), latency the worse "
           "pass's; client-side latency includes queueing in the server.", "", sw.to_markdown()]
    write_text(out / "serving.md", "\n".join(md))
    print("\n".join(md))
    return 0


def _srv(best) -> str:
    if best is None:
        return "none within the p99 bound"
    return (f"{best['throughput']:.2f} img/s ({best['instances']} instance(s) x {best['threads']} thread(s), "
            f"p99 {best['p99_ms']:.0f} ms)")


def _ort(best) -> str:
    return f"{best['img_s']:.2f} img/s (batch {best['batch']}, {best['threads']} thread(s))"


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
