"""LiteRT model (`<stem>.tflite`, and `<stem>.int8.tflite` with `--int8 static`) next to an exported
ONNX file (`export --format litert`).

Converted with litert-torch from the same torch model the ONNX file came from (LiteRT reads no
ONNX). A converted file's batch cannot be resized (XNNPACK's RESHAPE refuses it) and a symbolic
batch fails at timm's patch-embed view, so the file holds one fixed-batch signature `b<N>` per
batch size (`--litert-batches`, default 1 and the parity batches), sharing one set of weights. The
ONNX file's metadata_props go into the file's `p3b_metadata` entry (litert_io.embed_metadata).

fp32 is verified against torch like the ONNX file, on every signature: max abs logit difference
<= the export tolerance and identical top-1, random and real images. Static int8: PT2E (litert-torch's
symmetric per-channel int8 quantizer) on the transformer blocks only, calibrated on the same
training images as the ONNX static int8 file; patch embedding, final norm and head stay float, so
the file takes and returns float32 and callers need not quantize. It goes through the ONNX int8
files' gate: val top-1 at most `--int8-max-drop` points below fp32's (with labels), else top-1
agreement with fp32 >= 100 - P percent.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import ExportError
from ..litert_io import converter_unavailable, embed_metadata, load_tflite, signature_name
from .formats import Format, Job
from .runtime_parity import check_against_torch, gate_images, make_inputs, top1_gate, torch_logits

_log = logging.getLogger(__name__)
INT8_SUFFIX = ".int8.tflite"


@dataclass
class TfliteFile:
    """One .tflite written and verified by the exporter."""
    path: Path  # final location
    precision: str  # 'fp32' or 'int8'
    size_bytes: int
    batches: list[int]  # one signature b<N> per batch
    convert_seconds: float  # wall time of torch.export (+ calibration) + conversion
    max_abs_diff: float = float("nan")  # vs torch: max over the parity cases (fp32) / agreement images (int8)
    bound: float | None = None  # fp32: the bound it had to meet
    cases: list[dict[str, Any]] = field(default_factory=list)  # fp32 parity cases {data, batch, max_abs_diff, ...}
    gate: dict[str, Any] = field(default_factory=dict)  # int8: runtime_parity.ParityCase of top1_gate, as a dict


@dataclass
class LiteRTResult:
    """`--format litert`'s files."""
    fp32: TfliteFile
    int8: TfliteFile | None = None


def litert_batches(cfg: Any) -> list[int]:
    """The signatures' batch sizes: --litert-batches, else --static-batch, else 1 and the parity batches."""
    if cfg.litert_batches:
        return sorted({int(b) for b in cfg.litert_batches})
    return sorted({int(b) for b in cfg.batches()} | ({1} if not cfg.static_batch else set()))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or ["?"])[0][:200]


def _quiet() -> None:
    """litert-torch prints a progress line per conversion step unless told not to."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


@contextmanager
def _gather_writes(model: Any) -> Iterator[None]:
    """Slim branches write their kept output dims with index_add, which converts to a
    stablehlo.scatter that LiteRT's interpreter cannot run (only plain update/add/mul/max/min
    scatters are supported). While converting, each such branch writes with the exact gather
    form instead: x + cat([y, 0])[..., pos], pos[d] = where dim d sits in y, or the zero column."""
    import torch
    patched = []
    for m in model.modules():
        idx = getattr(m, "out_idx", None)
        if not (isinstance(idx, torch.Tensor) and callable(getattr(m, "write", None))):
            continue
        dim = _embed_dim(model)
        pos = torch.full((dim,), len(idx), dtype=torch.long)
        pos[idx] = torch.arange(len(idx))

        def write(x: Any, y: Any, m: Any = m, pos: Any = pos) -> Any:
            if m.gamma is not None:
                y = y * m.gamma
            y = torch.cat([m.drop_path(y), y.new_zeros(*y.shape[:-1], 1)], -1)
            return x + y.index_select(-1, pos)
        m.write = write
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.write


def _embed_dim(model: Any) -> int:
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not dim:
        raise ExportError("--format litert: cannot tell the model's embed dim for its residual writes")
    return int(dim)


def convert(model: Any, input_size: tuple[int, int, int], batches: Sequence[int],
            calibration: Any = None) -> bytes:
    """`model` as .tflite bytes, one `b<N>` signature per batch (fp32; int8 when `calibration`
    images are given). ExportError (one line) when litert-torch is missing or fails."""
    reason = converter_unavailable()
    if reason:
        raise ExportError(f"--format litert: {reason}")
    _quiet()
    import torch
    import litert_torch
    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    try:
        with _gather_writes(model):
            quant = None
            if calibration is not None:
                model, quant = _quantized(model, input_size, calibration)
            conv = litert_torch.Converter()
            for b in batches:
                conv.signature(signature_name(b), model, (torch.randn(int(b), *input_size, generator=gen),))
            with torch.no_grad():
                return bytes(conv.convert(quant_config=quant).model_content())
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 — torch.export / the converter raise many types
        raise ExportError(f"--format litert: conversion failed: {type(e).__name__}: {_first_line(e)}") from None


def _quantized(model: Any, input_size: tuple[int, int, int], calibration: Any) -> tuple[Any, Any]:
    """(the PT2E-quantized graph module, the QuantConfig that tells the converter to lower its
    Q/DQ pairs to int8 kernels). Only the transformer blocks are annotated (module types as
    torch.export records them), so the file's input and output stay float32."""
    import torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ExportError("--format litert --int8 static: the model has no transformer blocks (model.blocks) to "
                          "quantize")
    cfg = pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    quantizer = pq.PT2EQuantizer()
    for tp in {type(b) for b in blocks}:
        quantizer.set_module_type(f"{tp.__module__}.{tp.__qualname__}", cfg)
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gm = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
        gm = quantize_pt2e.prepare_pt2e(gm, quantizer)
        for i in range(0, len(calibration), 32):
            gm(calibration[i:i + 32].float())
        gm = move_exported_model_to_eval(quantize_pt2e.convert_pt2e(gm, fold_quantize=False))
    for m in gm.modules():  # the flag the converter reads (exported modules refuse .eval())
        m.training = False
    # QuantConfig reads the mode (static) from a global config; this quantizer's global is unset
    return gm, QuantConfig(pt2e_quantizer=pq.PT2EQuantizer().set_global(cfg))


def write_tflite(job: Job, precision: str, batches: Sequence[int]) -> TfliteFile:
    """Convert, embed the ONNX file's metadata, write into job.tmpdir (not yet verified)."""
    t0 = time.perf_counter()
    calib = job.calibration if precision == "int8" else None
    buf = convert(job.model, job.input_size, batches, calib)
    meta = {**job.metadata, "precision": precision, **({"quantization": "static"} if precision == "int8" else {})}
    buf = embed_metadata(buf, meta)
    name = job.out.stem + (INT8_SUFFIX if precision == "int8" else ".tflite")
    path = job.tmpdir / name
    path.write_bytes(buf)
    return TfliteFile(path=path, precision=precision, size_bytes=len(buf), batches=list(batches),
                      convert_seconds=round(time.perf_counter() - t0, 1))


def verify_fp32(job: Job, res: TfliteFile) -> TfliteFile:
    """Every signature against torch (random images, and real ones when given); ExportError on a miss."""
    prog = _load(res.path, job.cfg.threads)
    cfg = replace(job.cfg, static_batch=None, verify_batches=tuple(res.batches))
    ref = [(label, x.numpy(), torch_logits(job.model, x)) for label, x in make_inputs(cfg, job.input_size, job.real)]
    cases = check_against_torch(prog.run, ref, job.cfg.tol, f"LiteRT verification of {res.path.name} "
                                f"(signatures {[signature_name(b) for b in res.batches]})")
    res.max_abs_diff, res.bound, res.cases = max(c["max_abs_diff"] for c in cases), job.cfg.tol, cases
    return res


def gate_int8(job: Job, res: TfliteFile) -> TfliteFile:
    """The ONNX int8 files' gate (`top1_gate` on `gate_images`), with the torch fp32 logits as the
    reference; ExportError on a miss."""
    images, data = gate_images(job)
    prog = _load(res.path, job.cfg.threads)
    got = _run_padded(prog, images.numpy(), max(res.batches))
    ref = np.concatenate([torch_logits(job.model, images[i:i + 64]) for i in range(0, len(images), 64)])
    case, failures = top1_gate(got, ref, job.labels, data, "torch fp32", "int8", job.cfg)
    res.max_abs_diff, res.gate = case.max_abs_diff, asdict(case)
    if failures:
        raise ExportError(f"int8 verification of {res.path.name} failed: " + "; ".join(failures))
    return res


def _load(path: Path, threads: int | None) -> Any:
    from ..errors import P3BError
    try:
        return load_tflite(path, threads)
    except P3BError as e:
        raise ExportError(str(e)) from None


def _run_padded(prog: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits of every image, `batch` at a time on the b<batch> signature (the last batch zero-padded)."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)
        out.append(prog.run(np.concatenate([chunk, pad]).astype(np.float32))[:len(chunk)])
    return np.concatenate(out).astype(np.float64)


class LiteRTFormat(Format):
    """`--format litert`: the .tflite converted from the torch model (+ static int8 with --int8 static)."""
    name, suffix = "litert", ".tflite"

    def unavailable(self, cfg: Any) -> str | None:
        reason = converter_unavailable()
        return f"--format litert: {reason}" if reason else None

    def write(self, job: Job) -> LiteRTResult:
        batches = litert_batches(job.cfg)
        _log.info("converting to LiteRT (signatures %s); about 20 s per signature for a small model",
                  [signature_name(b) for b in batches])
        res = LiteRTResult(fp32=write_tflite(job, "fp32", batches))
        if job.cfg.int8 == "static":
            res.int8 = write_tflite(job, "int8", batches)
        elif job.cfg.int8:
            job.notes.append(f"--int8 {job.cfg.int8}: LiteRT int8 is static only (no .int8.tflite written)")
        return res

    def verify(self, job: Job, result: LiteRTResult) -> LiteRTResult:
        verify_fp32(job, result.fp32)
        result.fp32.path = job.out.with_suffix(".tflite")
        if result.int8 is not None:
            gate_int8(job, result.int8)
            result.int8.path = job.out.with_name(job.out.stem + INT8_SUFFIX)
        return result

    def files(self, out: Path, result: LiteRTResult) -> list[Path]:
        return [f.path for f in (result.fp32, result.int8) if f is not None]

    def describe(self, result: LiteRTResult) -> list[str]:
        f = result.fp32
        sigs = ", ".join(signature_name(b) for b in f.batches)
        lines = [f"  litert: {f.path} [{f.size_bytes / 1e6:.2f} MB, fp32, signatures {sigs}, converted in "
                 f"{f.convert_seconds:.0f} s], max |diff| vs torch {f.max_abs_diff:.2e}"]
        q = result.int8
        if q is not None:
            g = q.gate
            acc = f", val top-1 {g['top1']:.2f}% (fp32 {g['top1_fp32']:.2f}%)" if g.get("top1") is not None else ""
            lines.append(f"  litert int8 static: {q.path} [{q.size_bytes / 1e6:.2f} MB, float I/O, converted in "
                         f"{q.convert_seconds:.0f} s], top-1 agreement {g['top1_agreement']:.1f}% on {g['batch']} "
                         f"{g['data'].split(' ')[0]} images{acc}")
        return lines


FORMAT = LiteRTFormat()
