"""Where a benchmark ran: CPU, GPU, library versions, threads, date — recorded with every report.

Nothing here imports torch (versions come from package metadata, the GPU name from nvidia-smi or
from torch only when torch is already loaded), so the ONNX-only edge path can record it too.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

_PACKAGES = ("p3b-deploy", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "torch", "timm", "torch-pruning",
             "tensorrt", "openvino", "executorch", "ai-edge-litert", "litert-torch")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_model() -> str:
    """CPU model name (Linux /proc/cpuinfo, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of visible NVIDIA GPUs ([] when none or nvidia-smi is absent)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 — a broken driver must not break the report
            pass
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [l.strip() for l in out.stdout.splitlines() if l.strip()] if out.returncode == 0 else []


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter for timings (without importing them)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def apply_threads(threads: int | None) -> None:
    """Set OMP/MKL/OpenBLAS thread env and torch's thread count (if torch is loaded) to `threads`.

    ORT's intra-op count is set per session from the same value (see backends)."""
    if threads is None:
        return
    for k in _THREAD_ENV:
        os.environ[k] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def system_info(threads: int | None) -> dict:
    """One dict describing the machine and software a benchmark ran on."""
    torch = sys.modules.get("torch")
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpu_names(),
        "threads_requested": threads,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "thread_env": {k: os.environ.get(k) for k in _THREAD_ENV},
        "versions": versions(),
    }
