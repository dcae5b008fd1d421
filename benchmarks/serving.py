"""Serving benchmark: how much of in-process ONNX Runtime throughput survives serving through Triton.

For deit_small_patch16_224 (random weights) dense and a slim one at ~50% parameter reduction by
a P3B-shaped plan without residual pruning (`p3b_deploy.surgery.preview.preview_plan(...,
residual=False)`, the `p3b-bneck` shape of latency_sparsity.py), exported and
verified with `p3b_deploy.export`, served side by side by the bundled tritonserver (python
backend, dynamic batching up to 16, 1 ms queue delay; parity checked through the server). Then
`--rounds` rounds, each with two phases whose order alternates (in-process first in even rounds,
served first in odd ones), so the machine's drift hits both alike:
- in-process: ONNX Runtime in this process, intra-op threads x batches, dense and slim in turns;
- served: the serving config sweep of `bench --server --sweep` (instances x ORT threads per
  instance, one pass) with batch-1 requests at `--concurrency`, dense and slim in turns.
Per round, serving efficiency = best served img/s / best in-process img/s (same machine, same
cores; the client threads share the cores too); the summary gives the median over the rounds.
Every phase records the load average (os.getloadavg) before and after it: the machine is shared.
Last, a profile at each model's best served config says where the time goes: Triton's statistics
per request (queue, compute input / infer / output) and per executed batch, the client-side
latency, and the CPU seconds per image of the client (this process), tritonserver and the python
backend stubs, next to the in-process CPU seconds per image.
Goals (issue 19): efficiency >= 0.8 for both models, slim/dense served throughput >= 0.9 x MAC ratio.

Rerun (about 20 minutes on 2 busy cores; exports are cached in --work-dir; needs `bash scripts/setup.sh --serve`):
    .venv/bin/python benchmarks/serving.py
A reduced, bounded run (8 minutes at load 11 on 2 cores, export cached; the committed results):
    .venv/bin/python benchmarks/serving.py --rounds 3 --batches 1,8 --ort-threads 1,2 --ort-seconds 3 \
        --instances 1,2 --threads 1 --max-seconds 5 --profile-seconds 8
Writes benchmarks/results/serving.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
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
            done = {m: [0, 0.0, 0.0] for m in files}  # images, seconds, CPU seconds of this process
            feeds = {}
            for m, s in sessions.items():
                inp = s.get_inputs()[0]
                feeds[m] = (inp.name, np.random.default_rng(b).standard_normal((b, *inp.shape[1:])).astype(np.float32))
                s.run(None, {feeds[m][0]: feeds[m][1]})  # warm-up
            order = list(files)
            for _ in range(turns):
                for m in order:
                    name, x = feeds[m]
                    c0 = _cpu_self()
                    t0 = time.perf_counter()
                    while True:
                        sessions[m].run(None, {name: x})
                        done[m][0] += b
                        if time.perf_counter() - t0 >= seconds / turns:
                            break
                    done[m][1] += time.perf_counter() - t0
                    done[m][2] += _cpu_self() - c0
                order.reverse()
            for m, (images, secs, cpu) in done.items():
                rows.append({"model": m, "batch": b, "threads": t, "img_s": images / secs, "images": images,
                             "seconds": secs, "cpu_ms_per_image": 1000 * cpu / images})
            print(f"  in-process threads {t} batch {b}", {m: round(i / s_, 2) for m, (i, s_, _) in done.items()},
                  flush=True)
    return rows


def _cpu_self() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def group_cpu(pgid: int) -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds so far)} of the live processes in process group `pgid`
    (tritonserver and its python backend stubs: the server runs in its own group)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        comm, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(11) stime(12)
            out[int(d)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two `group_cpu` snapshots, by command name; a process that ended in
    between would be missing its last part, so that is refused."""
    gone = set(before) - set(after)
    if gone:
        raise RuntimeError(f"server processes ended during a CPU measurement: {sorted(gone)}")
    out: dict[str, float] = {}
    for pid, (comm, secs) in after.items():
        out[comm] = out.get(comm, 0.0) + secs - before.get(pid, (comm, 0.0))[1]
    return out


def load() -> list[float]:
    """1, 5, 15-minute load averages of the machine."""
    return [round(x, 2) for x in os.getloadavg()]


def start_server(files: dict[str, str], work: Path):
    """The files served side by side (python backend), parity through the server checked."""
    import numpy as np

    from p3b_deploy.export.triton import config_from_onnx, write_triton_repo
    from p3b_deploy.onnx_io import load_onnx_session
    from p3b_deploy.serve import TritonServer, infer
    repo = work / "serving-repo"
    for name, path in files.items():
        write_triton_repo(path, repo, config_from_onnx(path, name, backend="python", max_batch_size=16,
                                                       max_queue_delay_us=1000, intra_op_threads=1))
    server = TritonServer(repo, model_control="explicit", log_path=work / "tritonserver.log").start()
    parity = {}
    for name, path in files.items():
        sess = load_onnx_session(path, threads=1)[0]
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((2, *inp.shape[1:])).astype(np.float32)
        parity[name] = float(np.abs(infer(server.grpc_address, name, x) - sess.run(None, {inp.name: x})[0]).max())
    return server, parity


def served_phase(server, files: dict[str, str], args):
    """One pass of the config sweep at the given concurrency (the best config stays loaded)."""
    from p3b_deploy.serve.tune import sweep
    return sweep(server.grpc_address, list(files), {"instances": args.instances, "threads": args.threads},
                 p99_bound_ms=args.p99_ms, passes=1, progress=lambda m: print("  " + m, flush=True),
                 concurrency=(args.concurrency,), batch=1, max_seconds=args.max_seconds,
                 max_requests=args.max_requests, round_seconds=1.0, warmup_requests=1)


def _per(stat: dict, stat0: dict, key: str, n: int) -> float | None:
    """Mean ms per request (or execution) of one of Triton's cumulative duration counters."""
    ns = int(stat.get(key, {}).get("ns", 0)) - int(stat0.get(key, {}).get("ns", 0))
    return ns / 1e6 / n if n else None


def profile(server, model: str, path: str, setting: tuple[int, int], args) -> dict:
    """Where one model's served time goes at `setting` (instances, threads): Triton's statistics
    per request and per executed batch, client-side latency, CPU seconds per image by process;
    then the same file in-process at the mean batch the server executed (1 thread), right after."""
    from p3b_deploy.serve import bench_server
    from p3b_deploy.serve.tune import ModelLoader, with_settings
    loader = ModelLoader(server.grpc_address)
    try:
        loader.load(with_settings(loader.config(model), *setting))
    finally:
        loader.close()
    time.sleep(2.0)  # the replaced instance's stub exits
    pgid = server.process.pid
    st0, cpu0, self0, t0, load0 = server.statistics(model), group_cpu(pgid), _cpu_self(), time.perf_counter(), load()
    report = bench_server(server.grpc_address, [model], concurrency=(args.concurrency,), batch=1,
                          max_seconds=args.profile_seconds, max_requests=100000, round_seconds=args.profile_seconds,
                          warmup_requests=1)
    wall, st1, cpu1, self1 = time.perf_counter() - t0, server.statistics(model), group_cpu(pgid), _cpu_self()
    row = report.results[0]
    i0, i1 = st0["inference_stats"], st1["inference_stats"]
    reqs = int(i1["success"]["count"]) - int(i0["success"]["count"])
    execs = int(st1["execution_count"]) - int(st0["execution_count"])
    per_request = {k: _per(i1, i0, k, reqs) for k in ("success", "queue", "compute_input", "compute_infer",
                                                      "compute_output")}
    before = {b["batch_size"]: b for b in st0.get("batch_stats", [])}
    per_batch = {}
    for b in st1.get("batch_stats", []):
        b0 = before.get(b["batch_size"], {})
        n = int(b["compute_infer"]["count"]) - int(b0.get("compute_infer", {}).get("count", 0))
        if n:
            per_batch[int(b["batch_size"])] = {"executions": n, **{k: _per(b, b0, k, n) for k in (
                "compute_input", "compute_infer", "compute_output")}}
    images = reqs  # batch-1 requests (warm-up included, as in the server's counters)
    cpu = {"client (this process)": self1 - self0, **cpu_delta(cpu0, cpu1)}
    mean_batch = reqs / execs if execs else 1.0
    same = in_process({model: path}, [max(1, round(mean_batch))], [1], args.profile_seconds, turns=1)[0]
    return {"in_process_at_mean_batch": same, "model": model, "instances": setting[0], "threads": setting[1], "load_before": load0,
            "load_after": load(), "wall_s": wall, "throughput": row["throughput"],
            "client_mean_ms": row["mean_ms"], "client_median_ms": row["median_ms"], "client_p99_ms": row["p99_ms"],
            "requests_in_server": reqs, "executions": execs, "mean_batch": mean_batch,
            "server_ms_per_request": per_request, "per_batch_size": per_batch,
            "cpu_s": cpu, "cpu_ms_per_image": {k: 1000 * v / images for k, v in cpu.items()} if images else {}}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _median(xs) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="deit_small", choices=list(ARCHS))
    p.add_argument("--level", type=float, default=0.5, help="parameter reduction of the slim model (default 0.5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of in-process + served phases (order alternating)")
    p.add_argument("--batches", type=ints, default=(1, 4, 8, 16), help="in-process ORT batches")
    p.add_argument("--ort-seconds", type=float, default=3.0, help="in-process seconds per model, threads and batch")
    p.add_argument("--ort-threads", type=ints, default=(1, 2), help="in-process ORT intra-op threads")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight when served")
    p.add_argument("--instances", type=ints, default=(1, 2), help="sweep: model instances")
    p.add_argument("--threads", type=ints, default=(1, 2), help="sweep: ORT threads per instance")
    p.add_argument("--p99-ms", type=float, default=None, help="sweep: p99 bound for the best config")
    p.add_argument("--max-seconds", type=float, default=8.0, help="served: timed seconds per model and config")
    p.add_argument("--max-requests", type=int, default=2000, help="served: timed requests per model and config")
    p.add_argument("--profile-seconds", type=float, default=10.0, help="profile: timed seconds per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/p3b-serving", help="ONNX export cache and server repository")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    from p3b_deploy.bench.sysinfo import system_info
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    t_start = time.time()
    print(f"{args.arch}: building + exporting", flush=True)
    files = build(args.arch, args.level, args.seed, work)
    print(f"{args.arch}: starting the server", flush=True)
    server, parity = start_server(files, work)
    phases, rounds = [], []
    try:
        for r in range(args.rounds):
            order = ("in-process", "served") if r % 2 == 0 else ("served", "in-process")
            got = {}
            for phase in order:
                print(f"{args.arch}: round {r + 1}/{args.rounds}, {phase}", flush=True)
                l0, t0 = load(), time.perf_counter()
                if phase == "in-process":
                    got[phase] = in_process(files, list(args.batches), list(args.ort_threads), args.ort_seconds, turns=3)
                else:
                    got[phase] = served_phase(server, files, args)
                phases.append({"round": r + 1, "phase": phase, "load_before": l0, "load_after": load(),
                               "wall_s": round(time.perf_counter() - t0, 1)})
            rows, sw = got["in-process"], got["served"]
            best_ort = {m: max((x for x in rows if x["model"] == m), key=lambda x: x["img_s"]) for m in files}
            rounds.append({"round": r + 1, "order": list(order), "in_process": rows, "sweep": sw.to_dict(),
                           "best_in_process": best_ort, "best_served": sw.best,
                           "efficiency": {m: sw.best[m]["throughput"] / best_ort[m]["img_s"] if sw.best[m] else None
                                          for m in files}})
        # the profile: each model at its most frequent best served config (ties: the latest round's)
        settings = {}
        for m in files:
            picks = [(x["best_served"][m]["instances"], x["best_served"][m]["threads"]) for x in rounds
                     if x["best_served"][m]]
            settings[m] = max(reversed(picks), key=picks.count) if picks else (1, 1)
        prof = {}
        for m in files:
            print(f"{args.arch}: profile {m} at {settings[m][0]} instance(s) x {settings[m][1]} thread(s)", flush=True)
            prof[m] = profile(server, m, files[m], settings[m], args)
        runtime = {"tritonserver": "2.51 (nvidia-pytriton wheel)", **server.runtime.versions()}
    finally:
        server.stop()
    system = system_info(None)
    summary = summarize(files, rounds)
    summary["cpu_efficiency"] = {  # in-process CPU per image / served CPU per image (all processes)
        m: _median([x["best_in_process"][m]["cpu_ms_per_image"] for x in rounds]) / sum(q["cpu_ms_per_image"].values())
        for m, q in prof.items() if q["cpu_ms_per_image"]}
    write_json(out / "serving.json", {"command": command, "system": system, "minutes": (time.time() - t_start) / 60,
                                      "phases": phases, "rounds": rounds, "profile": prof, "parity": parity,
                                      "runtime": runtime, "summary": summary})
    md = markdown(args, command, system, runtime, parity, phases, rounds, prof, summary)
    write_text(out / "serving.md", "\n".join(md))
    print("\n".join(md))
    return 0


def summarize(files: dict[str, str], rounds: list[dict]) -> dict:
    """Medians over the rounds: efficiency per model, served and in-process slim/dense, the goals."""
    eff = {m: [x["efficiency"][m] for x in rounds] for m in files}
    srv = [x["best_served"]["slim"]["throughput"] / x["best_served"]["dense"]["throughput"] for x in rounds
           if x["best_served"]["slim"] and x["best_served"]["dense"]]
    ort = [x["best_in_process"]["slim"]["img_s"] / x["best_in_process"]["dense"]["img_s"] for x in rounds]
    row = rounds[0]["sweep"]["rows"]
    macs = {r["model"]: r["macs"] for r in row}
    mac_ratio = macs["dense"] / macs["slim"]
    med = {m: _median(v) if all(e is not None for e in v) else None for m, v in eff.items()}
    srv_ratio = _median(srv) if srv else None
    return {"efficiency_median": med, "efficiency_rounds": eff, "mac_ratio": mac_ratio,
            "served_ratio_median": srv_ratio, "served_ratio_rounds": srv, "in_process_ratio_median": _median(ort),
            "goals": {"efficiency >= 0.8": all(e is not None and e >= 0.8 for e in med.values()),
                      "served slim/dense >= 0.9 x MAC ratio": srv_ratio is not None and srv_ratio >= 0.9 * mac_ratio}}


def markdown(args, command, system, runtime, parity, phases, rounds, prof, summary) -> list[str]:
    loads = [x for ph in phases for x in (ph["load_before"][0], ph["load_after"][0])]
    eff, goals = summary["efficiency_median"], summary["goals"]
    md = [
        f"# Serving efficiency: {ARCHS[args.arch][0]} dense and slim through Triton (CPU)", "",
        f"{system['cpu']} ({system['cpu_count']} cores), {system['date']}. **The machine was shared with other "
        f"engineers' jobs**: 1-minute load average {min(loads):.1f} to {max(loads):.1f} over the phases "
        f"(per phase below); this is not a quiet-machine measurement. Triton 2.51.0 (tritonserver of "
        f"`nvidia-pytriton` {runtime.get('nvidia-pytriton')}, python backend running ONNX Runtime "
        f"{runtime.get('onnxruntime')}, numpy {runtime.get('numpy')}), in-process ONNX Runtime "
        f"{system['versions'].get('onnxruntime')}, Python {system['versions'].get('python')}.",
        f"Command: `.venv/bin/python {command}`", "",
        f"Random weights; slim = {int(args.level * 100)}% fewer parameters by a P3B-shaped plan without residual "
        f"pruning (MAC ratio {summary['mac_ratio']:.2f}x). Parity through the server vs ONNX Runtime: "
        f"{max(parity.values()):.1e}.", "",
        f"In-process and served phases are interleaved: {len(rounds)} round(s), each an in-process phase and a "
        "served phase, their order alternating; the server stays up (idle) during in-process phases. "
        "Efficiency = best served img/s / best in-process img/s of the same round.", "",
        "## Summary", "",
        "| | dense | slim |", "|---|---:|---:|",
        "| serving efficiency per round | " + " | ".join(", ".join(_f(e) for e in summary["efficiency_rounds"][m])
                                                       for m in ("dense", "slim")) + " |",
        f"| **median serving efficiency** | **{_f(eff['dense'])}** | **{_f(eff['slim'])}** |",
        "| CPU efficiency (in-process CPU ms per image / served CPU ms per image, all processes; profile) | "
        + " | ".join(_f(summary["cpu_efficiency"].get(m)) for m in ("dense", "slim")) + " |", "",
        "On a machine with more runnable threads than cores, a phase's img/s also depends on its share of "
        "the CPU (the served phase runs more processes and threads than the in-process loop, so it can get a "
        "larger share); CPU time per image does not, which is why it is given next to the img/s ratio.", "",
        f"Served slim/dense (median over rounds): {_f(summary['served_ratio_median'])}x; in-process "
        f"{summary['in_process_ratio_median']:.2f}x; MAC ratio {summary['mac_ratio']:.2f}x.", "",
        f"Goals: efficiency >= 0.8 for both: **{'met' if goals['efficiency >= 0.8'] else 'not met'}**; "
        f"served slim/dense >= 0.9 x MAC ratio ({0.9 * summary['mac_ratio']:.2f}x): "
        f"**{'met' if goals['served slim/dense >= 0.9 x MAC ratio'] else 'not met'}**.", "",
        "## Phases and machine load (1 / 5 / 15-minute load average)", "",
        "| round | phase | load before | load after | wall s |", "|---:|---|---|---|---:|"]
    for ph in phases:
        md.append(f"| {ph['round']} | {ph['phase']} | {' / '.join(map(str, ph['load_before']))} "
                  f"| {' / '.join(map(str, ph['load_after']))} | {ph['wall_s']} |")
    md += ["", "## Best per round", "", "| round | order | model | in-process best | served best | efficiency |",
           "|---:|---|---|---|---|---:|"]
    for x in rounds:
        for m in ("dense", "slim"):
            md.append(f"| {x['round']} | {' then '.join(x['order'])} | {m} | {_ort(x['best_in_process'][m])} "
                      f"| {_srv(x['best_served'][m])} | {_f(x['efficiency'][m])} |")
    md += ["", "## In-process ONNX Runtime (images/s per round; dense and slim in turns per batch)", "",
           "| threads | batch | dense img/s | slim img/s | slim / dense (median) |", "|---:|---:|---|---|---:|"]
    for t in args.ort_threads:
        for b in args.batches:
            v = {m: [next(r["img_s"] for r in x["in_process"] if (r["model"], r["threads"], r["batch"]) == (m, t, b))
                     for x in rounds] for m in ("dense", "slim")}
            md.append(f"| {t} | {b} | {', '.join(f'{a:.2f}' for a in v['dense'])} "
                      f"| {', '.join(f'{a:.2f}' for a in v['slim'])} "
                      f"| {_median([s / d for s, d in zip(v['slim'], v['dense'])]):.2f}x |")
    md += ["", f"## Served: config sweep per round (batch-1 requests, concurrency {args.concurrency})", "",
           "| model | instances | threads | img/s per round | p99 ms per round | server batch |",
           "|---|---:|---:|---|---|---:|"]
    keyed = {}
    for x in rounds:
        for r in x["sweep"]["rows"]:
            keyed.setdefault((r["model"], r["instances"], r["threads"]), []).append(r)
    for (m, i, t), rs in keyed.items():
        thr = ", ".join(f"{r['throughput']:.2f}" for r in rs)
        p99 = ", ".join(f"{r['p99_ms']:.0f}" for r in rs)
        batches = [r["server_batch"] for r in rs if r["server_batch"]]
        md.append(f"| {m} | {i} | {t} | {thr} | {p99} | {_f(_median(batches) if batches else None)} |")
    md += profile_markdown(rounds, prof, args)
    return md


def profile_markdown(rounds, prof, args) -> list[str]:
    """Where the served time goes, next to the in-process cost of the same work."""
    md = ["", f"## Where the time goes (profile at the best config, concurrency {args.concurrency}, "
              f"{args.profile_seconds:g} s per model)", "",
          "Triton's statistics, mean per request: `success` is the whole time inside the server, `queue` the "
          "wait for an instance (with 16 requests in flight most of it is waiting for the previous batch), "
          "`compute_infer` the python backend's execute() of the batch the request was in (the stub's numpy/"
          "ONNX Runtime work plus its IPC with tritonserver). The client-side latency adds gRPC and the client.", "",
          "| | " + " | ".join(prof) + " |", "|---|" + "---:|" * len(prof)]

    def line(label, fn):
        md.append(f"| {label} | " + " | ".join(fn(p_) for p_ in prof.values()) + " |")
    line("config (instances x threads)", lambda q: f"{q['instances']} x {q['threads']}")
    line("load before / after", lambda q: f"{q['load_before'][0]} / {q['load_after'][0]}")
    line("throughput img/s", lambda q: f"{q['throughput']:.2f}")
    line("client latency mean / p99 ms", lambda q: f"{q['client_mean_ms']:.0f} / {q['client_p99_ms']:.0f}")
    for k in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        line(f"server {k} ms / request", lambda q, k=k: _f(q["server_ms_per_request"][k], 1))
    line("mean batch per execution", lambda q: _f(q["mean_batch"]))
    md += ["", "compute_infer ms per execution at the batch sizes also timed in-process (executions of that size), "
               "next to in-process ONNX Runtime ms per batch of that size (1 thread, median over rounds); `all`: "
               "compute_infer ms per image over all executions vs in-process ms per image at batch 1:", "",
           "| model | batch | executions | compute_infer ms | in-process ms (1 thread) |", "|---|---:|---:|---:|---:|"]
    for m, q in prof.items():
        def ref(b):
            v = [1000 * r["batch"] / r["img_s"] for x in rounds for r in x["in_process"]
                 if (r["model"], r["threads"], r["batch"]) == (m, 1, b)]
            return _median(v) if v else None
        for b, v in sorted(q["per_batch_size"].items()):
            if b in args.batches:
                md.append(f"| {m} | {b} | {v['executions']} | {v['compute_infer']:.1f} | {_f(ref(b), 1)} |")
        ms = sum(v["compute_infer"] * v["executions"] for v in q["per_batch_size"].values())
        md.append(f"| {m} | all | {q['executions']} | {_f(ms / q['requests_in_server'] if q['requests_in_server'] else None, 1)}"
                  f" per image | {_f(ref(1), 1)} per image |")
    md += ["", "CPU milliseconds per image, by process (user + system; all cores), next to in-process ONNX Runtime "
               "at its best config:", "", "| process | " + " | ".join(prof) + " |", "|---|" + "---:|" * len(prof)]
    names = sorted({k for q in prof.values() for k in q["cpu_ms_per_image"]})
    for n in names:
        md.append(f"| {n} | " + " | ".join(_f(q["cpu_ms_per_image"].get(n), 1) for q in prof.values()) + " |")
    md.append("| **served total** | " + " | ".join(_f(sum(q["cpu_ms_per_image"].values()), 1) for q in prof.values())
              + " |")
    md.append("| in-process ORT, 1 thread, at the served mean batch (right after the profile) | "
              + " | ".join(f"{q['in_process_at_mean_batch']['cpu_ms_per_image']:.1f} (batch "
                           f"{q['in_process_at_mean_batch']['batch']}, {q['in_process_at_mean_batch']['img_s']:.2f} "
                           f"img/s)" for q in prof.values()) + " |")
    best = {m: [x["best_in_process"][m].get("cpu_ms_per_image") for x in rounds] for m in prof}
    md.append("| in-process ORT, best config of each round (median) | "
              + " | ".join(_f(_median(v), 1) for v in best.values()) + " |")
    md += ["", "Reading (CPU per image, from the table above):"]
    for m, q in prof.items():
        c = q["cpu_ms_per_image"]
        total, stub = sum(c.values()), sum(v for k, v in c.items() if k.startswith("triton_python"))
        same, ceiling = q["in_process_at_mean_batch"]["cpu_ms_per_image"], _median(best[m])
        md.append(f"- {m}: the python backend stubs use {stub / total:.0%} of the served CPU, tritonserver "
                  f"{c.get('tritonserver', 0.0) / total:.0%}, the gRPC client {c['client (this process)'] / total:.0%}. "
                  f"The stubs spend {stub / same:.2f}x the CPU per image of in-process ONNX Runtime on the same batch "
                  f"size (batch {q['in_process_at_mean_batch']['batch']}), and that batch size costs "
                  f"{same / ceiling:.2f}x the CPU per image of the in-process best config.")
    return md


def _srv(best) -> str:
    if best is None:
        return "none within the p99 bound"
    return (f"{best['throughput']:.2f} img/s ({best['instances']} instance(s) x {best['threads']} thread(s), "
            f"p99 {best['p99_ms']:.0f} ms)")


def _ort(best) -> str:
    return f"{best['img_s']:.2f} img/s (batch {best['batch']}, {best['threads']} thread(s))"


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
