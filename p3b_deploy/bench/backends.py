"""Benchmark backends: a name -> factory registry and one Runner per (model, backend, batch).

A Backend says whether it can run here (`unavailable` returns the reason it cannot) and prepares
a Runner, whose call runs one inference and returns its time in ms:
- ORT CPU: `session.run` on a numpy input, perf_counter around it.
- ORT CUDA / TensorRT: I/O binding with the input already on the GPU and the output left there,
  so the loop times compute only; host<->device copies are timed separately (h2d_ms, d2h_ms).
- torch CPU: eager forward under inference_mode (bf16 via autocast).
- torch CUDA: eager forward timed with CUDA events; fp16/bf16 via autocast (AMP).
- OpenVINO CPU: the ONNX file compiled at a static input shape with an explicit precision hint
  (fp32 -> f32, bf16 opt-in); the precision the compiled model reports is recorded.
- ExecuTorch (XNNPACK, fp32): a .pte file (`export --format executorch`, or lowered here from
  the torch model); `Method.execute` timed with perf_counter, XNNPACK's pool sized to --threads.
  ExecuTorch on x86 is not a phone: its numbers say how the program runs here, nothing more.
- LiteRT (CPU interpreter, XNNPACK): a .tflite file (`export --format litert`, given or next to the
  .onnx) with --threads interpreter threads, on the file's signature for the batch (a batch without
  one is skipped with the reason); the signature call timed with perf_counter. Torch-free. x86 is
  not a phone either.
Every Runner can also `infer` a batch (for the parity check against ORT CPU fp32).
ORT, OpenVINO and LiteRT backends import no torch; ExecuTorch's runtime needs torch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BenchError, P3BError
from .models import ModelSource

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Runner:
    """One prepared model on one backend at one batch size."""
    step: Callable[[], float]  # runs one inference, returns its time in ms
    info: dict[str, Any] = field(default_factory=dict)  # providers assigned, device, dtype, ...
    transfer: Callable[[], dict[str, float]] | None = None  # times host->device / device->host copies
    device_memory: Callable[[], float | None] | None = None  # device memory in MB, after warm-up
    close: Callable[[], None] = lambda: None  # frees the session / module
    infer: Callable[[np.ndarray], np.ndarray] | None = None  # logits of one float32 batch of this batch size


@dataclass
class Backend:
    """How to run models on one target; registered by name in BACKENDS."""
    name: str  # registry name, e.g. "ort-cpu"
    needs: str  # "onnx" (an .onnx file), "torch" (a torch module), "pte" (an ExecuTorch program), "tflite"
    #             (a LiteRT model) or "none"
    unavailable: Callable[[str], str | None]  # precision -> reason it cannot run here, or None
    prepare: Callable[..., Runner]  # (source, batch, precision, threads, work_dir) -> Runner


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------
_ORT_EP = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
           "ort-tensorrt": "TensorrtExecutionProvider"}


def _ort_unavailable(name: str) -> Callable[[str], str | None]:
    def check(precision: str) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        ep = _ORT_EP[name]
        if ep not in ort.get_available_providers():
            return (f"{ep} is not in this onnxruntime build (available: {', '.join(ort.get_available_providers())}"
                    + ("; install onnxruntime-gpu" if name != "ort-cpu" else "") + ")")
        if precision == "bf16":
            return "bf16 is not supported on the ONNX Runtime backends"
        return None
    return check


def _static_dims(onnx_shape, input_shape) -> list:
    """Non-batch input dims: the ONNX file's own, else the model's known (C, H, W)."""
    rest = list(onnx_shape[1:])
    if input_shape is not None and len(input_shape) == len(rest):
        return [d if isinstance(d, int) else int(s) for d, s in zip(rest, input_shape)]
    return rest


def _ort_input(sess, batch: int, input_shape, precision: str, name: str) -> np.ndarray:
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    fp16_file = dtype == np.float16 or sess.get_modelmeta().custom_metadata_map.get("precision") == "fp16"
    if precision == "fp32" and fp16_file:
        raise BenchError("this is an fp16 ONNX file; use --precision fp16")
    if precision == "fp16" and not fp16_file and name != "ort-tensorrt":
        raise BenchError(f"{name} runs fp16 only from an fp16 ONNX file (p3b-deploy export --fp16)")
    shape = [batch] + _static_dims(inp.shape, input_shape)
    if not all(isinstance(d, int) for d in shape):
        raise BenchError(f"cannot tell the input shape of the ONNX model (input {inp.name} {inp.shape})")
    if isinstance(inp.shape[0], int) and inp.shape[0] != batch:
        raise BenchError(f"the ONNX model has a fixed batch size {inp.shape[0]}, not {batch}")
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def _ort_session(name: str, path: str, batch: int, input_shape, precision: str, threads: int | None,
                 work_dir: Path):
    """Open an ORT session on the requested EP and check the EP was really assigned."""
    from ..onnx_io import load_onnx_session, session_options
    ep = _ORT_EP[name]
    if name == "ort-tensorrt":
        import onnxruntime as ort
        cache = work_dir / "trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        sess0 = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        inp = sess0.get_inputs()[0]
        shp = "x".join(str(d) for d in [batch] + _static_dims(inp.shape, input_shape))
        del sess0
        opts = {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache), "trt_profile_min_shapes": f"{inp.name}:{shp}",
                "trt_profile_opt_shapes": f"{inp.name}:{shp}", "trt_profile_max_shapes": f"{inp.name}:{shp}"}
        try:
            sess = ort.InferenceSession(path, sess_options=session_options(threads),
                                        providers=[(ep, opts), "CUDAExecutionProvider", "CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise BenchError(f"TensorRT session failed: {(str(e).strip().splitlines() or ['?'])[0][:240]}") from None
    else:
        try:
            sess, _ = load_onnx_session(path, providers=[ep] + (["CPUExecutionProvider"] if ep != _ORT_EP["ort-cpu"]
                                                                 else []), threads=threads)
        except P3BError as e:
            raise BenchError(str(e)) from None
    if sess.get_providers()[0] != ep:
        raise BenchError(f"{ep} could not be used (session fell back to {sess.get_providers()}; missing CUDA/"
                         "cuDNN/TensorRT libraries?)")
    return sess


def _ort_prepare(name: str) -> Callable[..., Runner]:
    def prepare(src: ModelSource, batch: int, precision: str, threads: int | None, work_dir: Path) -> Runner:
        sess = _ort_session(name, src.onnx_path, batch, src.input_shape, precision, threads, work_dir)
        x = _ort_input(sess, batch, src.input_shape, precision, name)
        if src.input_shape is None:
            src.input_shape = tuple(x.shape[1:])
        in_name = sess.get_inputs()[0].name
        info = {"providers": sess.get_providers(), "input_dtype": str(x.dtype),
                "intra_op_threads": threads or 0}
        if name == "ort-cpu":
            def step() -> float:
                t0 = time.perf_counter()
                sess.run(None, {in_name: x})
                return (time.perf_counter() - t0) * 1e3
            return Runner(step=step, info=info,
                          infer=lambda xb: np.asarray(sess.run(None, {in_name: xb.astype(x.dtype)})[0], np.float32))
        import onnxruntime as ort
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        io = sess.io_binding()
        io.bind_ortvalue_input(in_name, x_dev)
        for o in sess.get_outputs():
            io.bind_output(o.name, "cuda", 0)

        def step() -> float:  # ORT synchronises the CUDA stream at the end of run_with_iobinding
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            return (time.perf_counter() - t0) * 1e3

        def transfer() -> dict[str, float]:
            t0 = time.perf_counter()
            x_dev.update_inplace(x)
            t1 = time.perf_counter()
            io.copy_outputs_to_cpu()
            return {"h2d_ms": (t1 - t0) * 1e3, "d2h_ms": (time.perf_counter() - t1) * 1e3}
        return Runner(step=step, info=info, transfer=transfer, device_memory=_nvidia_smi_process_mb)
    return prepare


def _nvidia_smi_process_mb() -> float | None:
    """GPU memory this process holds, from nvidia-smi (ORT has no allocator statistics API)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()):
            return float(parts[1])
    return None


# --------------------------------------------------------------------------------------------
# torch eager
# --------------------------------------------------------------------------------------------
def _torch_unavailable(device: str) -> Callable[[str], str | None]:
    def check(precision: str) -> str | None:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            return "torch is not importable here (ONNX-only install)"
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if device == "cuda" and not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no CUDA device or a CPU-only torch build)"
        if device == "cpu" and precision == "fp16":
            return "fp16 on torch CPU is not a deployment target (use bf16)"
        if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "this GPU does not support bf16"
        return None
    return check


def _torch_prepare(device: str) -> Callable[..., Runner]:
    def prepare(src: ModelSource, batch: int, precision: str, threads: int | None, work_dir: Path) -> Runner:
        import torch
        module = src.module().eval().to(device)
        x = torch.randn(batch, *src.input_shape, generator=torch.Generator().manual_seed(0))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        info = {"device": device, "amp_dtype": str(dtype) if dtype else None, "torch_threads": torch.get_num_threads()}
        if device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
            info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        x_dev = x.to(device)

        def forward(inp=x_dev):
            with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                return module(inp)

        def infer(xb: np.ndarray) -> np.ndarray:
            out = forward(torch.from_numpy(xb).to(device))
            return (out[0] if isinstance(out, (tuple, list)) else out).float().cpu().numpy()

        if device == "cpu":
            def step() -> float:
                t0 = time.perf_counter()
                forward()
                return (time.perf_counter() - t0) * 1e3
            return Runner(step=step, info=info, close=lambda: None, infer=infer)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        out_holder: list = []

        def step() -> float:
            start.record()
            out = forward()
            end.record()
            end.synchronize()
            out_holder[:] = [out]
            return float(start.elapsed_time(end))

        def transfer() -> dict[str, float]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x.to(device)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            if out_holder:
                out_holder[0].cpu()
            return {"h2d_ms": (t1 - t0) * 1e3, "d2h_ms": (time.perf_counter() - t1) * 1e3}

        def memory() -> float:
            return torch.cuda.max_memory_allocated() / 2**20

        def close() -> None:
            module.to("cpu")
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return Runner(step=step, info=info, transfer=transfer, device_memory=memory, close=close, infer=infer)
    return prepare


# --------------------------------------------------------------------------------------------
# OpenVINO (CPU plugin)
# --------------------------------------------------------------------------------------------
def _ov_unavailable(precision: str) -> str | None:
    from ..openvino_io import unavailable
    return unavailable(precision)


def _ov_prepare(src: ModelSource, batch: int, precision: str, threads: int | None, work_dir: Path) -> Runner:
    from ..openvino_io import compile_model, inference_precision, run
    import openvino as ov
    dims = list(ov.Core().read_model(src.onnx_path).inputs[0].get_partial_shape())[1:]
    rest = [int(d.get_length()) if d.is_static else None for d in dims]
    if src.input_shape is not None and len(src.input_shape) == len(rest):
        rest = [r if r is not None else int(s) for r, s in zip(rest, src.input_shape)]
    if any(r is None for r in rest):
        raise BenchError(f"cannot tell the input shape of the ONNX model (input dims {dims})")
    if src.input_shape is None:
        src.input_shape = tuple(rest)
    shape = (batch, *rest)
    try:
        compiled = compile_model(src.onnx_path, precision, threads, shape)
    except P3BError as e:
        raise BenchError(str(e)) from None
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    info = {"providers": ["OpenVINO CPU"], "inference_precision": inference_precision(compiled),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}

    def step() -> float:
        t0 = time.perf_counter()
        req.infer({0: x})
        return (time.perf_counter() - t0) * 1e3
    return Runner(step=step, info=info, infer=lambda xb: run(compiled, xb.astype(np.float32), req))


# --------------------------------------------------------------------------------------------
# ExecuTorch (XNNPACK)
# --------------------------------------------------------------------------------------------
def _et_unavailable(precision: str) -> str | None:
    from ..executorch_io import unavailable
    return unavailable(precision)


def _et_prepare(src: ModelSource, batch: int, precision: str, threads: int | None, work_dir: Path) -> Runner:
    from ..executorch_io import load_pte, set_threads
    import torch
    path = src.ensure_pte(work_dir, batch)
    try:
        pool = set_threads(threads)
        prog = load_pte(path)
    except P3BError as e:
        raise BenchError(str(e)) from None
    if batch > prog.max_batch:
        raise BenchError(f"{Path(path).name} runs batches up to {prog.max_batch}, not {batch} "
                         "(export --format executorch --executorch-max-batch N)")
    if src.input_shape is None:
        src.input_shape = prog.input_shape
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, *prog.input_shape)).astype(np.float32))
    method = prog.method
    info = {"providers": ["ExecuTorch XNNPACK"], "threads": pool, "pte": str(path), "pte_max_batch": prog.max_batch}

    def step() -> float:
        t0 = time.perf_counter()
        method.execute([x])
        return (time.perf_counter() - t0) * 1e3
    return Runner(step=step, info=info, infer=prog.forward)


# --------------------------------------------------------------------------------------------
# LiteRT (CPU interpreter, XNNPACK)
# --------------------------------------------------------------------------------------------
def _litert_unavailable(precision: str) -> str | None:
    from ..litert_io import unavailable
    return unavailable(precision)


def _litert_prepare(src: ModelSource, batch: int, precision: str, threads: int | None, work_dir: Path) -> Runner:
    from ..litert_io import load_tflite
    path = src.ensure_tflite()
    try:
        prog = load_tflite(path, threads)
        run = prog.runner(batch)
    except P3BError as e:
        raise BenchError(str(e)) from None
    if src.input_shape is None:
        src.input_shape = prog.input_shape
    x = np.random.default_rng(0).standard_normal((batch, *prog.input_shape)).astype(np.float32)
    info = {"providers": ["LiteRT XNNPACK"], "threads": threads or 0, "tflite": str(path),
            "signatures": prog.batches, "int8_io": prog.int8_io,
            "inference_precision": prog.metadata.get("precision")}

    def step() -> float:
        t0 = time.perf_counter()
        run(x)
        return (time.perf_counter() - t0) * 1e3
    return Runner(step=step, info=info, infer=run)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
BACKENDS: dict[str, Callable[[], Backend]] = {
    "ort-cpu": lambda: Backend("ort-cpu", "onnx", _ort_unavailable("ort-cpu"), _ort_prepare("ort-cpu")),
    "ort-cuda": lambda: Backend("ort-cuda", "onnx", _ort_unavailable("ort-cuda"), _ort_prepare("ort-cuda")),
    "ort-tensorrt": lambda: Backend("ort-tensorrt", "onnx", _ort_unavailable("ort-tensorrt"),
                                    _ort_prepare("ort-tensorrt")),
    "torch-cpu": lambda: Backend("torch-cpu", "torch", _torch_unavailable("cpu"), _torch_prepare("cpu")),
    "torch-cuda": lambda: Backend("torch-cuda", "torch", _torch_unavailable("cuda"), _torch_prepare("cuda")),
    "openvino": lambda: Backend("openvino", "onnx", _ov_unavailable, _ov_prepare),
    "executorch": lambda: Backend("executorch", "pte", _et_unavailable, _et_prepare),
    "litert": lambda: Backend("litert", "tflite", _litert_unavailable, _litert_prepare),
}
# Short names accepted by --providers.
ALIASES = {"cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "ort-tensorrt", "trt": "ort-tensorrt", "ov": "openvino",
           "et": "executorch", "tflite": "litert"}


def require_available(names: list[str] | tuple[str, ...], precision: str = "fp32") -> None:
    """Refuse (BenchError, one line) a runtime the user asked for by name that cannot run here.

    `benchmark()` itself lists an unavailable backend as a skipped row (a deployment matrix or a
    default backend list says what could not run); a runtime named on purpose is refused instead,
    before any model is timed."""
    for name in names:
        reason = create_backend(name).unavailable(precision)
        if reason:
            raise BenchError(f"runtime '{name}' cannot run here at {precision}: {reason}")


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Add a backend (e.g. OpenVINO) under `name`."""
    BACKENDS[name] = factory


def create_backend(name: str) -> Backend:
    """The backend registered under `name` (or a --providers alias); BenchError if unknown."""
    key = ALIASES.get(name, name)
    if key not in BACKENDS:
        raise BenchError(f"unknown backend '{name}'; choose from {', '.join([*BACKENDS, *ALIASES])}")
    return BACKENDS[key]()
