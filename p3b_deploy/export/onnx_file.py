"""The ONNX file every export writes (format `onnx`): torch export, metadata, verification,
graph hygiene and the fp16 / int8 variants.

`write` exports with torch's dynamo exporter (falling back to the TorchScript exporter only with
the reason recorded), writes `metadata_props`, optionally simplifies (onnxslim) and writes the
requested fp16 / int8 files next to it; `verify` runs `verify_onnx` (checker + ONNX Runtime vs
torch at every parity batch), reports the graph's index ops and their measured runtime share, and
gates every variant (val top-1 vs fp32's, or top-1 agreement without labels).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .config import DEFAULT_OPSET, ExportConfig
from .formats import Format, Job
from .runtime_parity import ParityCase, agreement, gate_images, make_inputs, top1_gate, torch_logits
from ..errors import ExportError
from ..onnx_io import _first_line, _open, session_options
from ..onnx_quant import quantize_dynamic_int8, quantize_static_int8

_log = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization is a single op from 17 on
INDEX_OPS = ("Gather", "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Slice", "Transpose")
INPUT_NAME, OUTPUT_NAME = "images", "logits"

# ============================================================================ results
@dataclass
class ParityReport:
    """Verification of one ONNX file: checker plus every parity case; `failures` lists all misses."""
    path: str  # file verified
    precision: str  # 'fp32', 'fp16' or 'int8'
    checker: str  # 'ok' or the checker's message
    cases: list[ParityCase] = field(default_factory=list)  # every comparison run
    failures: list[str] = field(default_factory=list)  # human-readable misses (empty = passed)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=0.0)

    def raise_if_failed(self) -> None:
        if self.failures:
            raise ExportError(f"{self.precision} verification of {Path(self.path).name} failed: "
                              + "; ".join(self.failures))


@dataclass
class GraphReport:
    """Index-handling ops of the graph and their measured share of ONNX Runtime time."""
    op_counts: dict[str, int]  # every op type in the exported graph
    index_ops: dict[str, int]  # counts of Gather/Scatter/Slice/Transpose-like ops
    index_scopes: dict[str, dict[str, int]]  # op -> module scope (e.g. blocks.3.mlp) -> count
    runtime_share: dict[str, float]  # op type (after ORT fusion) -> fraction of node time
    index_share: float  # summed runtime share of INDEX_OPS
    profile_batch: int  # batch size of the profiled runs
    profile_runs: int  # profiled runs
    threads: int | None  # ORT intra-op threads used


@dataclass
class VariantResult:
    """An fp16 / int8 file written next to the fp32 one."""
    precision: str  # 'fp16' or 'int8'
    path: Path  # final location
    size_bytes: int  # file size
    parity: ParityReport  # its verification
    quantization: str | None = None  # int8: 'dynamic' or 'static' (QDQ)




# ============================================================================ export
class _Logits(nn.Module):
    """Names the graph input `images` and guarantees one logits tensor as output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, (tuple, list)) else out


def _check_opset(opset: int) -> None:
    import onnx
    hi = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= hi:
        raise ExportError(f"unsupported opset {opset}: this exporter supports {MIN_OPSET}..{hi} "
                          f"(default {DEFAULT_OPSET})")


def _quiet_exporter_logs() -> None:
    """onnx_ir / onnxscript log every graph rewrite at INFO; the CLI logs at INFO."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime"):
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)


def _torch_export(model: nn.Module, path: Path, example: torch.Tensor, opset: int,
                  dynamic: bool) -> tuple[str, str | None]:
    """Dynamo export, TorchScript fallback; returns (exporter, fallback reason)."""
    _quiet_exporter_logs()
    wrapped = _Logits(model).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
            torch.onnx.export(wrapped, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=shapes, external_data=False, verbose=False)
        return "dynamo", None
    except Exception as e:  # noqa: BLE001 — any exporter failure triggers the documented fallback
        reason = f"{type(e).__name__}: {_first_line(e)}"
    _log.warning("dynamo exporter failed (%s); falling back to the TorchScript exporter", reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
            torch.onnx.export(wrapped, (example,), str(path), dynamo=False, opset_version=min(opset, 20),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export failed with both exporters: dynamo: {reason}; "
                          f"torchscript: {type(e).__name__}: {_first_line(e)}") from None
    return "torchscript", reason


def _scope(node: Any) -> str:
    """Module path of a node from the dynamo exporter's metadata (e.g. 'blocks.3.mlp'), or ''."""
    for p in node.metadata_props:
        if p.key == "namespace":
            parts = [seg.split(":")[0].strip().removeprefix("model.") for seg in p.value.split("/")]
            mods = [s for s in parts if s.startswith("blocks.")]
            if mods:
                segs = mods[-1].split(".")
                return ".".join(segs[:3])
            return parts[-2] if len(parts) > 1 else ""
    return ""


def _finish_graph(path: Path, metadata: dict[str, str], strip: bool) -> tuple[int, dict[str, dict[str, int]]]:
    """Write metadata_props; record index-op scopes, then drop per-node debug strings. Returns opset."""
    import onnx
    mp = onnx.load(str(path))
    scopes: dict[str, dict[str, int]] = {}
    for n in mp.graph.node:
        if n.op_type in INDEX_OPS:
            s = _scope(n) or "(top)"
            scopes.setdefault(n.op_type, {}).setdefault(s, 0)
            scopes[n.op_type][s] += 1
        if strip:
            del n.metadata_props[:]
    del mp.metadata_props[:]
    for k, v in metadata.items():
        mp.metadata_props.add(key=str(k), value=str(v))
    opset = next((o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")), 0)
    onnx.save(mp, str(path))
    return int(opset), scopes


def _set_metadata(path: Path, updates: dict[str, str]) -> None:
    import onnx
    mp = onnx.load(str(path))
    meta = {p.key: p.value for p in mp.metadata_props}
    meta.update(updates)
    del mp.metadata_props[:]
    for k, v in meta.items():
        mp.metadata_props.add(key=k, value=v)
    onnx.save(mp, str(path))


def _simplify(path: Path) -> None:
    try:
        import onnxslim
    except ImportError:
        raise ExportError("--simplify needs onnxslim: pip install onnxslim") from None
    try:
        onnxslim.slim(str(path), str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnxslim failed: {_first_line(e)}") from None




# ============================================================================ verification
def _run_ort(sess: Any, x: torch.Tensor, io_dtype: np.dtype = np.float32) -> np.ndarray:
    return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(io_dtype)})[0], dtype=np.float64)


def _check(path: Path) -> str:
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 — checker raises ValidationError / InferenceError
        return f"{type(e).__name__}: {_first_line(e)}"
    return "ok"


def verify_onnx(path: str | os.PathLike, model: nn.Module, inputs: Sequence[tuple[str, torch.Tensor]] | torch.Tensor,
                tol: float = 1e-4, *, threads: int | None = None) -> ParityReport:
    """fp32 verification: full onnx.checker, then ORT CPU vs torch on every (label, batch) input:
    max abs logit difference <= `tol` and identical top-1. Collects every failure; the caller
    decides (ParityReport.raise_if_failed)."""
    path = Path(path)
    if isinstance(inputs, torch.Tensor):
        inputs = [("random", inputs)]
    rep = ParityReport(path=str(path), precision="fp32", checker=_check(path))
    if rep.checker != "ok":
        rep.failures.append(f"onnx.checker: {rep.checker}")
    sess, _ = _open(path, None, session_options(threads))
    _check_io(sess, rep)
    for label, x in inputs:
        ref, got = torch_logits(model, x), _run_ort(sess, x)
        if got.shape != ref.shape:
            rep.failures.append(f"{label} batch {len(x)}: output shape {got.shape}, torch {ref.shape}")
            continue
        diff = float(np.abs(got - ref).max())
        agr = agreement(ref, got, tie=2 * tol)
        case = ParityCase(label, len(x), diff, tol, agr, 100.0, ok=diff <= tol and agr == 100.0)
        rep.cases.append(case)
        if diff > tol:
            rep.failures.append(f"{label} batch {len(x)}: max |diff| {diff:.3e} > {tol:g}")
        if agr < 100.0:
            rep.failures.append(f"{label} batch {len(x)}: top-1 differs on {100 - agr:.1f}% of images")
    return rep


def _check_io(sess: Any, rep: ParityReport) -> None:
    ins, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if ins != [INPUT_NAME] or outs != [OUTPUT_NAME]:
        rep.failures.append(f"graph IO is {ins} -> {outs}, expected ['{INPUT_NAME}'] -> ['{OUTPUT_NAME}']")


# ============================================================================ graph hygiene
def graph_report(path: Path, input_size: tuple[int, int, int], scopes: dict[str, dict[str, int]],
                 cfg: ExportConfig) -> GraphReport:
    """Count index ops in the file and measure each op type's share of ORT node time."""
    import onnx
    mp = onnx.load(str(path))
    counts: dict[str, int] = {}
    for n in mp.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    batch = cfg.static_batch or cfg.profile_batch
    share = profile_op_share(path, batch, input_size, cfg.profile_runs, cfg.threads)
    return GraphReport(
        op_counts=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        index_ops={k: counts.get(k, 0) for k in INDEX_OPS}, index_scopes=scopes,
        runtime_share=share, index_share=round(sum(share.get(k, 0.0) for k in INDEX_OPS), 4),
        profile_batch=batch, profile_runs=cfg.profile_runs, threads=cfg.threads)


def profile_op_share(path: Path, batch: int, input_size: tuple[int, int, int], runs: int = 5,
                     threads: int | None = None) -> dict[str, float]:
    """Fraction of ORT CPU kernel time per op type (after ORT's own fusions), over `runs` runs."""
    with tempfile.TemporaryDirectory() as d:
        sess, _ = _open(path, None, session_options(threads, profile_prefix=os.path.join(d, "prof")))
        x = {INPUT_NAME: np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)}
        sess.run(None, x)  # warm-up is profiled too; skipped below by counting runs
        for _ in range(runs):
            sess.run(None, x)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(ev.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    return {k: round(v / total, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


# ============================================================================ fp16 / int8 variants
def _variants(job: Job, fp32: Path) -> list[VariantResult]:
    """fp16 / int8 files, each verified (and refused) before anything is published."""
    cfg, out, input_size = job.cfg, job.out, job.input_size
    result: list[VariantResult] = []
    if not (cfg.fp16 or cfg.int8):
        return result
    agree_x, data = gate_images(job)
    sess32, _ = _open(fp32, None, session_options(cfg.threads))
    ref = _batched(lambda x: _run_ort(sess32, x), agree_x)
    for precision in [p for p, on in (("fp16", cfg.fp16), ("int8", cfg.int8)) if on]:
        name = f"{out.stem}.{precision}.onnx"
        path = job.tmpdir / name
        mode = cfg.int8 if precision == "int8" else None
        if precision == "fp16":
            _to_fp16(fp32, path, cfg)
        elif mode == "static":
            _to_int8_static(fp32, path, job.calibration)
        else:
            _to_int8(fp32, path, cfg)
        _set_metadata(path, {"precision": precision, **({"quantization": mode} if mode else {})})
        rep = _verify_variant(path, precision, job.model, ref, agree_x, data, job.labels, cfg, input_size)
        rep.path = str(out.with_name(name))
        rep.raise_if_failed()
        result.append(VariantResult(precision, out.with_name(name), path.stat().st_size, rep, mode))
    return result


def _batched(fn, x: torch.Tensor, chunk: int = 32) -> np.ndarray:
    return np.concatenate([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def _to_fp16(src: Path, dst: Path, cfg: ExportConfig) -> None:
    import onnx
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ExportError("--fp16 needs onnxconverter-common: pip install onnxconverter-common") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m16 = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=not cfg.fp16_io)
    onnx.save(m16, str(dst))


def _to_int8(src: Path, dst: Path, cfg: ExportConfig) -> None:
    quantize_dynamic_int8(src, dst)


def _to_int8_static(src: Path, dst: Path, calibration: torch.Tensor | None) -> None:
    """Static QDQ int8 (`onnx_quant.quantize_static_int8`) calibrated on `calibration` images."""
    if calibration is None or len(calibration) == 0:
        raise ExportError("--int8 static needs calibration images: pass --data SPEC (its training images "
                          "calibrate the activations)")
    quantize_static_int8(src, dst, ({INPUT_NAME: calibration[i:i + 32].float().numpy()}
                                    for i in range(0, len(calibration), 32)))


def _verify_variant(path: Path, precision: str, model: nn.Module, ref32: np.ndarray, agree_x: torch.Tensor,
                    data: str, labels: torch.Tensor | None, cfg: ExportConfig,
                    input_size: tuple[int, int, int]) -> ParityReport:
    """fp16: bounded diff vs torch at the parity batches. Then the gate: with labels, val top-1 at
    most `int8_max_drop` (int8) / 100 - fp16_min_agreement (fp16) points below the fp32 file's;
    without labels, top-1 agreement with the fp32 file (enforced for int8, and for fp16 on real data)."""
    rep = ParityReport(path=str(path), precision=precision, checker=_check(path))
    if rep.checker != "ok":
        rep.failures.append(f"onnx.checker: {rep.checker}")
    sess, _ = _open(path, None, session_options(cfg.threads))
    _check_io(sess, rep)
    io = np.float16 if precision == "fp16" and cfg.fp16_io else np.float32
    if precision == "fp16":
        for label, x in make_inputs(cfg, input_size, agree_x if data == "real" else None):
            ref, got = torch_logits(model, x), _run_ort(sess, x, io)
            bound = cfg.fp16_rtol * max(1.0, float(np.abs(ref).max()))
            diff = float(np.abs(got - ref).max())
            rep.cases.append(ParityCase(label, len(x), diff, bound, agreement(ref, got), None, diff <= bound))
            if diff > bound:
                rep.failures.append(f"{label} batch {len(x)}: max |diff| {diff:.3e} > {bound:.3e}")
    got = _batched(lambda x: _run_ort(sess, x, io), agree_x)
    case, failures = top1_gate(got, ref32, labels, data, "fp32 ONNX", precision, cfg)
    rep.cases.append(case)
    rep.failures += failures
    return rep


# ============================================================================ the format
@dataclass
class OnnxFile:
    """The fp32 ONNX file as written and verified (ExportResult carries these fields)."""
    path: Path  # in the temp folder until published
    exporter: str  # 'dynamo' or 'torchscript'
    fallback_reason: str | None  # why the dynamo exporter was not used (None = it was)
    export_seconds: float  # wall time of the torch export
    opset: int  # opset in the file
    scopes: dict[str, dict[str, int]]  # index op -> module scope -> count
    metadata: dict[str, str] = field(default_factory=dict)  # metadata_props in the file
    parity: ParityReport | None = None  # fp32 verification
    graph: GraphReport | None = None  # index-op hygiene report
    variants: list[VariantResult] = field(default_factory=list)  # fp16 / int8 files


class OnnxFormat(Format):
    """Always written: the fp32 file the other formats hand off from. Its fp16 / int8 variants are
    derived from the verified file, so `verify` makes them, each gated before anything is published."""
    name, suffix = "onnx", ".onnx"

    def write(self, job: Job) -> OnnxFile:
        cfg, meta = job.cfg, job.metadata
        fp32 = job.tmpdir / job.out.name
        example = torch.randn(cfg.static_batch or 2, *job.input_size, generator=torch.Generator().manual_seed(cfg.seed))
        t0 = time.perf_counter()
        exporter, reason = _torch_export(job.model, fp32, example, cfg.resolved_opset(), cfg.dynamic_batch)
        seconds = time.perf_counter() - t0
        if reason:
            meta["exporter_fallback"] = reason
        meta["exporter"] = exporter
        opset, scopes = _finish_graph(fp32, meta, cfg.strip_node_metadata)
        if cfg.simplify:
            _simplify(fp32)
        job.onnx = fp32
        return OnnxFile(path=fp32, exporter=exporter, fallback_reason=reason, export_seconds=round(seconds, 2),
                        opset=opset, scopes=scopes)

    def verify(self, job: Job, result: OnnxFile) -> OnnxFile:
        parity = verify_onnx(result.path, job.model, job.inputs, tol=job.cfg.tol, threads=job.cfg.threads)
        parity.path = str(job.out)
        parity.raise_if_failed()
        result.parity = parity
        result.graph = graph_report(result.path, job.input_size, result.scopes, job.cfg)
        result.variants = _variants(job, result.path)
        result.metadata = read_metadata(result.path)
        job.metadata = result.metadata
        return result

    def files(self, out: Path, result: OnnxFile) -> list[Path]:
        """The variants (the fp32 file itself is published last, by the exporter)."""
        return [v.path for v in result.variants]

    def describe(self, result: Any) -> list[str]:
        """Lines for the ExportResult `result` (the ONNX file's fields are the result's own)."""
        kb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
        ex = result.exporter + (f" (fallback: {result.fallback_reason})" if result.fallback_reason else "")
        cfg = result.config
        lines = [f"wrote {result.path}  [{kb(result.size_bytes)}, opset {result.opset}, {ex}"
                 f"{', onnxslim' if result.simplified else ''}]",
                 f"  parity fp32: max |diff| {result.parity.max_abs_diff:.2e} (bound {cfg.tol:g}), "
                 f"top-1 identical, batches {list(cfg.batches())}"
                 f"{' + real images' if any(c.data == 'real' for c in result.parity.cases) else ''}"]
        g = result.graph
        idx = ", ".join(f"{k} {v}" for k, v in g.index_ops.items() if v) or "none"
        lines.append(f"  index ops: {idx}; runtime share {100 * g.index_share:.1f}% "
                     f"(ORT CPU, batch {g.profile_batch}, {g.profile_runs} runs)")
        for v in result.variants:
            gate = v.parity.cases[-1]
            acc = (f", val top-1 {gate.top1:.2f}% (fp32 {gate.top1_fp32:.2f}%)" if gate.top1 is not None else "")
            name = v.precision + (f" {v.quantization}" if v.quantization else "")
            lines.append(f"  {name}: {v.path} [{kb(v.size_bytes)}], max |diff| "
                         f"{v.parity.max_abs_diff:.2e}, top-1 agreement {gate.top1_agreement:.1f}% on "
                         f"{gate.batch} {gate.data.split(' ')[0]} images{acc}")
        return lines


def read_metadata(path: Path) -> dict[str, str]:
    import onnx
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


FORMAT = OnnxFormat()
