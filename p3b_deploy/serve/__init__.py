"""Serve exported models with a local Triton Inference Server and measure them through it.

- `TritonServer(repo, restart=True)`: start / wait ready / stop a tritonserver (context manager),
  loopback only, supervised (restarted with the reason when it dies), HTTP behind `HttpFront`.
- `find_runtime()`: the bundled runtime from `bash scripts/setup.sh --serve`, or a given binary.
- `infer`, `model_info`, `bench_server(address, models) -> BenchReport`: gRPC/HTTP clients.
- `sweep(address, models, grid) -> SweepResult`: the instances x threads config with most throughput.
- `serve_check(dense_onnx, slim_onnx, work_dir) -> ServeCheck`: the pipeline's serving stage.
Nothing here imports torch; tritonclient is imported only where a request is sent.
"""
from .check import ServeCheck, serve_check
from .client import ModelInfo, ServerBenchConfig, bench_server, check_loopback, infer, model_info, parse_address
from .runtime import TritonRuntime, find_runtime
from .front import FrontConfig, HttpFront
from .server import RestartPolicy, TritonServer, check_port, load_failure
from .tune import SweepResult, sweep

__all__ = ["TritonServer", "TritonRuntime", "find_runtime", "check_port", "load_failure", "infer", "model_info",
           "ModelInfo", "bench_server", "ServerBenchConfig", "check_loopback", "parse_address", "serve_check",
           "ServeCheck", "HttpFront", "FrontConfig", "RestartPolicy", "sweep", "SweepResult"]
