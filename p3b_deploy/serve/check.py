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
                "runtime": self.runtime, "report_dir": str(self.report_dir) if self.report_dir else None}


def serving_row(check: dict[str, Any], baseline: str = "dense", model: str = "slim") -> str:
    """One Markdown row of a `| | dense | slim | slim / dense |` table from `ServeCheck.to_dict()`:
    served throughput and p99 at the highest concurrency, and the throughput ratio."""
    thr, p99 = check["throughput"], check["p99_ms"]
    return (f"| served img/s, p99 (Triton gRPC, concurrency {check['concurrency']}) "
            f"| {thr[baseline]:.1f}, {p99[baseline]:.1f} ms | {thr[model]:.1f}, {p99[model]:.1f} ms "
            f"| {thr[model] / thr[baseline]:.2f}x faster (parity vs ORT {max(check['parity'].values()):.1e}) |")


def serve_check(onnx_files: Mapping[str, str | os.PathLike], work_dir: str | os.PathLike, *,
                tritonserver: str | os.PathLike | None = None, batches: Sequence[int] = (1, 5),
                tol: float = 1e-5, concurrency: Sequence[int] = (1, 4), max_seconds: float = 2.0,
                max_requests: int = 500, max_batch_size: int = 16, max_queue_delay_us: int = 100,
                intra_op_threads: int = 1, seed: int = 0) -> ServeCheck:
    """Serve `onnx_files` ({model name: file}, the first is the baseline) and check them.

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
                                                        intra_op_threads=intra_op_threads))
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
        report = bench_server(server.grpc_address, list(onnx_files), concurrency=tuple(concurrency),
                              max_seconds=max_seconds, max_requests=max_requests, round_seconds=0.25,
                              warmup_requests=2)
        runtime = {"tritonserver": str(server.runtime.binary), **server.runtime.versions()}
    report.system["server"].update(runtime)
    report_dir = report.save(work / "serving")
    top = max(int(c) for c in concurrency)
    rows = {r["model"]: r for r in report.results if r["concurrency"] == top}
    return ServeCheck(repo=repo, parity=parity, tol=tol, concurrency=top,
                      throughput={m: rows[m]["throughput"] for m in onnx_files},
                      p99_ms={m: rows[m]["p99_ms"] for m in onnx_files},
                      server_batch={m: rows[m]["server_batch"] for m in onnx_files}, runtime=runtime,
                      report_dir=report_dir, report=report)
