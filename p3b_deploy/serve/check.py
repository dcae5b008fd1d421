"""`serve_check`: the pipeline's serving stage in one call — repository, server, parity, load.

Builds a python-flavour Triton repository with the given ONNX files side by side, serves it with
the local tritonserver, checks that the served logits equal ONNX Runtime's on the same file (over
gRPC and HTTP, several batch sizes) and measures throughput through gRPC, slim vs dense.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ServeError


@dataclass
class ServeCheck:
    """What serving the models showed."""
    repo: Path  # the Triton model repository that was served
    parity: dict[str, float]  # model -> max |served - ONNX Runtime| over the checked batches/protocols
    tol: float  # parity tolerance (abs)
    concurrency: int  # the highest concurrency measured
    throughput: dict[str, float]  # model -> images/s at that concurrency
    p99_ms: dict[str, float]  # model -> p99 request latency (ms) at that concurrency
    server_batch: dict[str, float | None] = field(default_factory=dict)  # mean images per server execution
    rounds: int = 1  # measurement rounds (throughput/p99 above: medians over them)
    ratio: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> throughput / baseline's, per round
    runtime: dict[str, Any] = field(default_factory=dict)  # server binary and the stub's package versions
    report_dir: Path | None = None  # the benchmark report (report.{json,md,csv})
    report: Any = None  # the BenchReport

    def speedup(self, model: str, baseline: str) -> float:
        return self.throughput[model] / self.throughput[baseline]

    def summary_row(self, baseline: str = "dense", model: str = "slim") -> str:
        return serving_row(self.to_dict(), baseline, model)

    def to_dict(self) -> dict[str, Any]:
        return {"repo": str(self.repo), "parity": self.parity, "tol": self.tol, "concurrency": self.concurrency,
                "throughput": self.throughput, "p99_ms": self.p99_ms, "server_batch": self.server_batch,
                "rounds": self.rounds, "ratio": self.ratio, "runtime": self.runtime,
                "report_dir": str(self.report_dir) if self.report_dir else None}


def ratio_words(ratio: float) -> str:
    """'1.23x faster' / '0.80x, i.e. 1.25x slower' (a ratio below 1 is never called faster)."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{ratio:.2f}x, i.e. {1 / ratio:.2f}x slower"


def serving_row(check: dict[str, Any], baseline: str = "dense", model: str = "slim") -> str:
    """One Markdown row of a `| | dense | slim | slim / dense |` table from `ServeCheck.to_dict()`:
    served throughput and p99 at the highest concurrency (medians over the rounds) and the
    throughput ratio: the median of the per-round ratios, with their range."""
    thr, p99 = check["throughput"], check["p99_ms"]
    r = check.get("ratio", {}).get(model)
    n = check.get("rounds", 1)
    if r:
        ratio = ratio_words(r["median"])
        if n > 1:
            ratio += f" (median of {n} rounds, range {r['min']:.2f}-{r['max']:.2f}x" + \
                (", within noise)" if r["min"] < 1 < r["max"] else ")")
    else:
        ratio = ratio_words(thr[model] / thr[baseline])
    rounds = f", median of {n} rounds" if n > 1 else ""
    return (f"| served img/s, p99 (Triton gRPC, concurrency {check['concurrency']}{rounds}) "
            f"| {thr[baseline]:.1f}, {p99[baseline]:.1f} ms | {thr[model]:.1f}, {p99[model]:.1f} ms "
            f"| {ratio}; parity vs ORT {max(check['parity'].values()):.1e} |")


def combine_rounds(reports: Sequence[Any], baseline: str) -> tuple[list[dict], dict[tuple[str, int], list[float]]]:
    """Rows with the median over rounds of each (model, concurrency) (throughput, percentiles,
    server batch; requests and seconds summed) and {(model, concurrency): per-round ratios to
    `baseline`}: ratios are paired within a round, where both models saw the same machine."""
    import statistics
    by: dict[tuple[str, int], list[dict]] = {}
    for rep in reports:
        for row in rep.results:
            by.setdefault((row["model"], row["concurrency"]), []).append(row)
    ratios = {}
    rows = []
    for (model, c), rs in by.items():
        base = by[(baseline, c)]
        ratios[(model, c)] = [r["throughput"] / b["throughput"] for r, b in zip(rs, base)]
        out = dict(rs[0])
        for key in ("throughput", "median_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms"):
            out[key] = statistics.median(r[key] for r in rs)
        batches = [r["server_batch"] for r in rs if r.get("server_batch") is not None]
        out["server_batch"] = statistics.median(batches) if batches else None
        for key in ("requests", "images", "timed_s", "iters"):
            out[key] = sum(r[key] for r in rs)
        out.update(rounds=len(rs), throughput_min=min(r["throughput"] for r in rs),
                   throughput_max=max(r["throughput"] for r in rs), speedup=statistics.median(ratios[(model, c)]),
                   speedup_min=min(ratios[(model, c)]), speedup_max=max(ratios[(model, c)]))
        out["speedup_efficiency"] = out["speedup"] / out["mac_reduction"] if out.get("mac_reduction") else None
        rows.append(out)
    return rows, ratios


def serve_check(onnx_files: Mapping[str, str | os.PathLike], work_dir: str | os.PathLike, *,
                tritonserver: str | os.PathLike | None = None, batches: Sequence[int] = (1, 5),
                tol: float = 1e-5, concurrency: Sequence[int] = (1, 4), rounds: int = 5, max_seconds: float = 1.0,
                max_requests: int = 500, max_batch_size: int = 16, max_queue_delay_us: int = 100,
                intra_op_threads: int = 1, instance_count: int = 1, seed: int = 0) -> ServeCheck:
    """Serve `onnx_files` ({model name: file}, the first is the baseline) and check them.

    Throughput is measured in `rounds` rounds (each: every model in turns, at most `max_seconds`
    and `max_requests` per model and level); the check reports medians over the rounds and the
    per-round throughput ratios to the baseline, whose spread says how much to trust them.

    Raises ServeError if the server cannot load a model (with its reason) or parity exceeds `tol`.
    `intra_op_threads` is ONNX Runtime's per model instance inside the server (1: models and the
    benchmark's client threads share few cores without oversubscription)."""
    from ..onnx_io import load_onnx_session
    from ..export.triton import config_from_onnx, write_triton_repo
    from .client import bench_server, infer
    from .server import TritonServer
    if not onnx_files:
        raise ServeError("serve_check needs at least one ONNX file")
    work = Path(work_dir)
    repo = work / "triton_repo"
    for name, path in onnx_files.items():
        write_triton_repo(path, repo, config_from_onnx(path, name, backend="python", max_batch_size=max_batch_size,
                                                        max_queue_delay_us=max_queue_delay_us,
                                                        intra_op_threads=intra_op_threads,
                                                        instance_count=instance_count))
    rng = np.random.default_rng(seed)
    parity: dict[str, float] = {}
    with TritonServer(repo, log_path=work / "tritonserver.log") as server:
        for name, path in onnx_files.items():
            sess, _ = load_onnx_session(path, threads=1)
            inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
            worst = 0.0
            for b in batches:
                x = rng.standard_normal((b, *inp.shape[1:])).astype(np.float32)
                ref = sess.run([out.name], {inp.name: x})[0]
                for protocol, address in (("grpc", server.grpc_address), ("http", server.http_url)):
                    got = infer(address, name, x, protocol=protocol, input_name=inp.name, output_name=out.name)
                    if got.shape != ref.shape:
                        raise ServeError(f"served model '{name}' returned shape {got.shape}, ONNX Runtime {ref.shape}")
                    worst = max(worst, float(np.abs(got - ref).max()))
            parity[name] = worst
            if not worst <= tol:
                raise ServeError(f"served model '{name}' differs from ONNX Runtime on {path} by {worst:.2e} > {tol}")
        if rounds < 1:
            raise ServeError(f"rounds must be >= 1, got {rounds}")
        reports = [bench_server(server.grpc_address, list(onnx_files), concurrency=tuple(concurrency),
                                max_seconds=max_seconds, max_requests=max_requests, round_seconds=0.25,
                                warmup_requests=2) for _ in range(rounds)]
        runtime = {"tritonserver": str(server.runtime.binary), **server.runtime.versions()}
    baseline = next(iter(onnx_files))
    report = reports[0]
    report.results, ratios = combine_rounds(reports, baseline)
    report.config["rounds"] = rounds
    report.config["notes"].append(f"medians over {rounds} rounds; speedup = median of the per-round ratios "
                                  "(speedup_min/max: their range)")
    report.system["server"].update(runtime)
    report_dir = report.save(work / "serving")
    top = max(int(c) for c in concurrency)
    rows = {r["model"]: r for r in report.results if r["concurrency"] == top}
    return ServeCheck(repo=repo, parity=parity, tol=tol, concurrency=top,
                      throughput={m: rows[m]["throughput"] for m in onnx_files},
                      p99_ms={m: rows[m]["p99_ms"] for m in onnx_files},
                      server_batch={m: rows[m]["server_batch"] for m in onnx_files}, rounds=rounds,
                      ratio={m: {"median": rows[m]["speedup"], "min": rows[m]["speedup_min"],
                                 "max": rows[m]["speedup_max"], "per_round": ratios[(m, top)]} for m in onnx_files},
                      runtime=runtime, report_dir=report_dir, report=report)
