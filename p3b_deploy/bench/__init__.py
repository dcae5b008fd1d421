"""Benchmark harness: latency, throughput, MACs and memory on ONNX Runtime and torch backends.

`benchmark(models, ...) -> BenchReport` times files (torch models: `p3b_deploy.deploy.benchmark`,
which plugs in the exporter). Nothing imported here pulls in torch, so
an .onnx file can be benchmarked on a device that has only onnxruntime and numpy.
"""
from .backends import BACKENDS, Backend, Runner, create_backend, register_backend
from .latency_table import LatencyTable, LatencyTableError, measure_pack
from .onnx_macs import OnnxCounts, count_onnx
from .report import BenchReport
from .runner import BenchConfig, benchmark

__all__ = ["benchmark", "BenchReport", "BenchConfig", "count_onnx", "OnnxCounts", "BACKENDS", "Backend", "Runner",
           "create_backend", "register_backend", "LatencyTable", "LatencyTableError", "measure_pack"]
