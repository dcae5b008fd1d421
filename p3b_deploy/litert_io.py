"""LiteRT (TensorFlow Lite) runtime access shared by `bench` (backend `litert`) and `export --format litert`.

A `.tflite` file here holds one signature per batch size, `b<N>` (images (N, C, H, W) -> logits),
sharing one set of weights (a converted file's batch cannot be resized: XNNPACK's RESHAPE refuses
it), and the ONNX file's metadata_props as JSON in the model metadata entry `p3b_metadata`, so the
file describes its own preprocessing and classes. A static int8 file computes in int8 with float
inputs and outputs; should a file take int8 I/O, `run` quantizes and dequantizes with the file's
own scale and zero point.

Torch-free: the runtime is `ai-edge-litert` (numpy + flatbuffers), whose CPU interpreter delegates
the graph to XNNPACK. Converting needs `litert-torch` (and torch), in `.venv-edge`
(bash scripts/setup_edge.sh): see `p3b_deploy.export.litert_tflite`.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import P3BError

METADATA_NAME = "p3b_metadata"
SETUP = "run bash scripts/setup_edge.sh"
MISSING_RUNTIME = f"ai-edge-litert is not installed here: {SETUP} (elsewhere: pip install ai-edge-litert)"
MISSING_CONVERTER = f"litert-torch is not installed here: {SETUP}"


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: made unimportable on purpose
        return False


def unavailable(precision: str = "fp32") -> str | None:
    """Why a .tflite cannot run at `precision` here, or None (int8 files run as `fp32`: the file
    decides what it computes in)."""
    if not _found("ai_edge_litert"):
        return MISSING_RUNTIME
    if precision != "fp32":
        return f"{precision}: the LiteRT backend runs the file as converted (fp32 or int8 .tflite), ask for fp32"
    return None


def converter_unavailable() -> str | None:
    """Why a torch model cannot be converted to .tflite here, or None."""
    for mod, why in (("litert_torch", MISSING_CONVERTER), ("ai_edge_litert", MISSING_RUNTIME)):
        if not _found(mod):
            return why
    return None


def signature_name(batch: int) -> str:
    return f"b{int(batch)}"


@dataclass
class Signature:
    """One `b<N>` signature: its fixed input shape and I/O quantization."""
    key: str
    batch: int
    input_shape: tuple[int, ...]  # (C, H, W); (T, D) for a latency probe branch
    input_name: str
    input_dtype: Any  # numpy dtype class (float32, or int8 for a file with int8 I/O)
    input_quant: tuple[float, int]  # (scale, zero point); (0.0, 0) = not quantized
    output_dtype: Any
    output_quant: tuple[float, int]


@dataclass
class TfliteProgram:
    """A loaded .tflite: `run(x)` runs one float32 batch on the signature of that batch size."""
    path: Path
    interpreter: Any  # ai_edge_litert.interpreter.Interpreter
    signatures: dict[int, Signature]  # batch -> signature
    threads: int | None
    metadata: dict[str, str] = field(default_factory=dict)
    _runners: dict[int, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def batches(self) -> list[int]:
        return sorted(self.signatures)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return next(iter(self.signatures.values())).input_shape

    @property
    def int8_io(self) -> bool:
        return any(s.input_dtype != np.float32 for s in self.signatures.values())

    def runner(self, batch: int) -> Callable[[np.ndarray], np.ndarray]:
        """float32 (batch, C, H, W) -> float32 logits on the `b<batch>` signature; P3BError
        (one line) when the file has no signature for `batch`."""
        if batch not in self._runners:
            sig = self.signatures.get(int(batch))
            if sig is None:
                raise P3BError(f"{self.path.name} has no signature for batch {batch} (it has batches "
                               f"{self.batches}: export --format litert --litert-batches ...)")
            self._runners[batch] = _signature_runner(self.interpreter, sig)
        return self._runners[batch]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.runner(len(x))(x)


def _quantize(x: np.ndarray, dtype: Any, quant: tuple[float, int]) -> np.ndarray:
    scale, zero = quant
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _signature_runner(interp: Any, sig: Signature) -> Callable[[np.ndarray], np.ndarray]:
    run = interp.get_signature_runner(sig.key)
    out_name = next(iter(run.get_output_details()))

    def call(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if sig.input_dtype != np.float32:
            x = _quantize(x, sig.input_dtype, sig.input_quant)
        try:
            y = run(**{sig.input_name: x})[out_name]
        except (RuntimeError, ValueError) as e:  # e.g. an op the interpreter cannot prepare
            raise P3BError(f"signature {sig.key} does not run on LiteRT's interpreter: "
                           f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None
        if sig.output_dtype != np.float32:
            y = (y.astype(np.float32) - sig.output_quant[1]) * sig.output_quant[0]
        return np.asarray(y, dtype=np.float32)
    return call


def _signatures(interp: Any, name: str) -> dict[int, Signature]:
    sigs: dict[int, Signature] = {}
    for key in interp.get_signature_list():
        run = interp.get_signature_runner(key)
        ins, outs = run.get_input_details(), run.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise P3BError(f"{name}: signature {key} has {len(ins)} inputs and {len(outs)} outputs, expected images "
                           "-> logits")
        (in_name, i), o = next(iter(ins.items())), next(iter(outs.values()))
        shape = [int(d) for d in i["shape"]]
        if len(shape) < 2:  # images (N, C, H, W); a latency probe's branch takes tokens (N, T, D)
            raise P3BError(f"{name}: signature {key} takes shape {shape}, expected a batch (N, C, H, W)")
        sigs[shape[0]] = Signature(key=key, batch=shape[0], input_shape=tuple(shape[1:]),  # type: ignore[arg-type]
                                   input_name=in_name, input_dtype=i["dtype"],
                                   input_quant=(float(i["quantization"][0]), int(i["quantization"][1])),
                                   output_dtype=o["dtype"],
                                   output_quant=(float(o["quantization"][0]), int(o["quantization"][1])))
    if not sigs:
        raise P3BError(f"{name} has no signatures (not written by export --format litert?)")
    return sigs


def load_tflite(path: str | os.PathLike, threads: int | None = None) -> TfliteProgram:
    """Load a .tflite written by `export --format litert` on the CPU interpreter (XNNPACK) with
    `threads` threads (None: the runtime's default); P3BError (one line) if it is not one."""
    reason = unavailable()
    if reason:
        raise P3BError(reason)
    from ai_edge_litert.interpreter import Interpreter
    path = Path(path)
    if not path.is_file():
        raise P3BError(f"LiteRT model not found: {path}")
    try:
        interp = Interpreter(model_path=str(path), num_threads=int(threads) if threads else None)
        sigs = _signatures(interp, path.name)
        meta = read_metadata(path)
    except P3BError:
        raise
    except Exception as e:  # noqa: BLE001 — the runtime raises ValueError/RuntimeError with long texts
        raise P3BError(f"{path.name} is not a loadable LiteRT model: "
                       f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None
    return TfliteProgram(path=path, interpreter=interp, signatures=sigs, threads=threads, metadata=meta)


def read_metadata(model: str | os.PathLike | bytes) -> dict[str, str]:
    """The `p3b_metadata` entry of a .tflite (path or bytes) as a dict ({} when it has none)."""
    from ai_edge_litert import schema_py_generated as schema
    buf = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    m = schema.Model.GetRootAs(buf, 0)
    for i in range(m.MetadataLength()):
        entry = m.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            data = m.Buffers(entry.Buffer()).DataAsNumpy()
            return json.loads(bytes(data).decode())
    return {}


def embed_metadata(buf: bytes, metadata: dict[str, str]) -> bytes:
    """`buf` (a .tflite) with `metadata` as JSON in its `p3b_metadata` entry (replaced if present).
    Repacks the flatbuffer the way LiteRT's own flatbuffer_utils writes models."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(buf))
    data = np.frombuffer(json.dumps(dict(metadata), sort_keys=True).encode(), dtype=np.uint8)
    entries = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode() and m.name != METADATA_NAME]
    blob = schema.BufferT()
    blob.data = data
    model.buffers.append(blob)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*entries, entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
