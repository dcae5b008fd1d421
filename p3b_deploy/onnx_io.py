"""Open an exported ONNX file with ONNX Runtime — the loader `export` verification and `bench` share.

This module must never import torch (nor anything that does): the ONNX benchmark path runs on
edge devices that have only onnxruntime and numpy. A missing, truncated or corrupt file is refused
with a one-line `ExportError` instead of an ONNX Runtime traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ExportError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed (pip install onnxruntime)") from None
    return ort


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return line[:240]


def session_options(threads: int | None = None, profile_prefix: str | None = None) -> Any:
    """ORT session options: fixed intra-op threads (None = ORT default), optional profiling."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    if threads is not None:
        if int(threads) < 1:
            raise ExportError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def load_onnx_session(path: str | os.PathLike, providers: list[str] | None = None,
                      threads: int | None = None) -> tuple[Any, dict[str, str]]:
    """Open `path` in ONNX Runtime; return (InferenceSession, metadata_props as a dict).

    `providers` defaults to CPU only; a provider this onnxruntime build lacks is an error (callers
    that want to skip it check `onnxruntime.get_available_providers()` first)."""
    return _open(path, providers, session_options(threads))


def _open(path: str | os.PathLike, providers: list[str] | None, so: Any) -> tuple[Any, dict[str, str]]:
    ort = _import_ort()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    if path.stat().st_size == 0:
        raise ExportError(f"ONNX file is empty: {path}")
    providers = list(providers) if providers else list(DEFAULT_PROVIDERS)
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise ExportError(f"execution provider(s) {missing} not available in this onnxruntime "
                          f"build (available: {ort.get_available_providers()})")
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # noqa: BLE001 — ORT raises several pybind types; report as one line
        raise ExportError(f"cannot load ONNX file {path} (corrupt or truncated?): {_first_line(e)}") from None
    if not sess.get_inputs() or not sess.get_outputs():
        raise ExportError(f"ONNX file {path} has no inputs or outputs")
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    return sess, meta


# ONNX Runtime's load errors that mean "this is not a usable ONNX model" (not: "this build lacks a
# kernel or provider for it", which the runtime that times the file reports in its own row).
_NOT_A_MODEL = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument", "Fail")


def check_onnx_file(path: str | os.PathLike) -> None:
    """Refuse (ExportError, one line) a file that is not a loadable ONNX model, before any timing.

    With the `onnx` package the protobuf is parsed (external weights not read) and must hold a
    graph with inputs and outputs; without it (an edge install) ONNX Runtime opens the file on
    the CPU with graph optimisations off."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    if path.stat().st_size == 0:
        raise ExportError(f"ONNX file is empty: {path}")
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 — protobuf DecodeError and friends
            raise ExportError(f"{path} is not an ONNX model (protobuf parsing failed: {_first_line(e)})") from None
        if model.ir_version < 1 or not model.graph.input or not model.graph.output:
            raise ExportError(f"{path} is not an ONNX model (no graph with inputs and outputs)")
        return
    ort = _import_ort()
    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), sess_options=so, providers=list(DEFAULT_PROVIDERS))
    except Exception as e:  # noqa: BLE001 — ORT raises one pybind type per status code
        if type(e).__name__ in _NOT_A_MODEL:
            raise ExportError(f"{path} is not a loadable ONNX model: {_first_line(e)}") from None
