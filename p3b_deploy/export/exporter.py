"""ONNX export that users can trust without opening the file.

`export_onnx(model, out, input_size=...)` exports with torch's dynamo exporter (falling back to the
TorchScript exporter only with the reason recorded), writes `metadata_props`, optionally
simplifies (onnxslim), always verifies (`verify_onnx`: checker + ONNX Runtime vs torch at two
batch sizes), reports the graph's index ops and their measured runtime share, adds fp16 / int8
variants next to the file on request, and writes `<stem>.export.json` with every number.
Everything is built in a temp folder and moved into place only when all checks pass, so a failed
export leaves no file behind. `load_source` resolves a slim dir, a run dir or a timm name.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__
from .config import DEFAULT_OPSET, FORMATS, INT8_MODES, ExportConfig
from .metadata import metadata_for
from ..errors import ExportError, P3BError
from ..io import _check_parent, write_json
from ..onnx_io import _first_line, _open, session_options
from ..onnx_quant import quantize_dynamic_int8, quantize_static_int8

_log = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization is a single op from 17 on
INDEX_OPS = ("Gather", "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Slice", "Transpose")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


# ============================================================================ config / results
@dataclass
class ParityCase:
    """One comparison of ONNX Runtime against the torch model."""
    data: str  # 'random' or 'real'
    batch: int  # images in the batch (for agreement checks: images compared)
    max_abs_diff: float  # max |logit_onnx - logit_torch|
    bound: float | None  # the bound max_abs_diff had to meet (None = not checked)
    top1_agreement: float  # percent of images with the same top-1 class
    top1_required: float | None  # percent required (None = not checked)
    ok: bool  # both checks passed
    top1: float | None = None  # val top-1 accuracy (percent) of this file, when labels were given
    top1_fp32: float | None = None  # val top-1 of the fp32 file on the same images
    max_drop: float | None = None  # points top1 may be below top1_fp32 (None = not checked)


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


@dataclass
class ExportResult:
    """Everything `export_onnx` produced and measured (also written as <stem>.export.json)."""
    path: Path  # the fp32 ONNX file
    opset: int  # opset in the file
    exporter: str  # 'dynamo' or 'torchscript'
    fallback_reason: str | None  # why the dynamo exporter was not used (None = it was)
    input_size: tuple[int, int, int]  # C, H, W
    dynamic_batch: bool  # batch axis is symbolic
    size_bytes: int  # file size
    parity: ParityReport  # fp32 verification
    graph: GraphReport  # index-op hygiene report
    metadata: dict[str, str]  # metadata_props written into the file
    variants: list[VariantResult]  # fp16 / int8 files
    report_path: Path  # the <stem>.export.json
    config: ExportConfig  # resolved options
    export_seconds: float  # wall time of the torch export
    simplified: bool = False  # onnxslim was applied
    triton_dir: Path | None = None  # REPO/<name> written for Triton, if requested
    openvino: Any = None  # openvino_ir.IRResult when --format openvino
    executorch: Any = None  # executorch_pte.PteResult when --format executorch
    notes: list[str] = field(default_factory=list)  # what the reader should know (e.g. a weak gate)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metadata"] = {k: v for k, v in self.metadata.items() if k != "class_names"}
        names = json.loads(self.metadata.get("class_names", "null") or "null")
        d["metadata"]["class_names"] = None if names is None else f"({len(names)} names, in the ONNX file)"
        return json.loads(json.dumps(d, default=str))

    def summary(self) -> str:
        """A few lines for the CLI: parity, size, ops."""
        kb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
        ex = self.exporter + (f" (fallback: {self.fallback_reason})" if self.fallback_reason else "")
        lines = [f"wrote {self.path}  [{kb(self.size_bytes)}, opset {self.opset}, {ex}"
                 f"{', onnxslim' if self.simplified else ''}]",
                 f"  parity fp32: max |diff| {self.parity.max_abs_diff:.2e} (bound {self.config.tol:g}), "
                 f"top-1 identical, batches {list(self.config.batches())}"
                 f"{' + real images' if any(c.data == 'real' for c in self.parity.cases) else ''}"]
        g = self.graph
        idx = ", ".join(f"{k} {v}" for k, v in g.index_ops.items() if v) or "none"
        lines.append(f"  index ops: {idx}; runtime share {100 * g.index_share:.1f}% "
                     f"(ORT CPU, batch {g.profile_batch}, {g.profile_runs} runs)")
        for v in self.variants:
            gate = v.parity.cases[-1]
            acc = (f", val top-1 {gate.top1:.2f}% (fp32 {gate.top1_fp32:.2f}%)" if gate.top1 is not None else "")
            name = v.precision + (f" {v.quantization}" if v.quantization else "")
            lines.append(f"  {name}: {v.path} [{kb(v.size_bytes)}], max |diff| "
                         f"{v.parity.max_abs_diff:.2e}, top-1 agreement {gate.top1_agreement:.1f}% on "
                         f"{gate.batch} {gate.data.split(' ')[0]} images{acc}")
        if self.openvino is not None:
            lines.append(f"  openvino: {self.openvino.xml} + .bin [{kb(self.openvino.size_bytes)}], max |diff| vs "
                         f"torch {self.openvino.max_abs_diff:.2e} ({self.openvino.precision} inference)")
        if self.executorch is not None:
            et = self.executorch
            batch = f"batch 1..{et.max_batch}" if et.dynamic_batch else f"batch {et.max_batch}"
            off = ", ".join(f"{k} {v}" for k, v in et.portable_ops.items()) or "none"
            lines.append(f"  executorch: {et.path} [{kb(et.size_bytes)}, XNNPACK fp32, {batch}, lowered in "
                         f"{et.lower_seconds:.0f} s], max |diff| vs torch {et.max_abs_diff:.2e}; "
                         f"{et.delegated_subgraphs} XNNPACK partitions, outside XNNPACK: {off}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.triton_dir:
            lines.append(f"  triton: {self.triton_dir}/config.pbtxt + 1/model.onnx")
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


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


def _make_inputs(cfg: ExportConfig, input_size: tuple[int, int, int],
                 real: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    """(label, batch) pairs for the parity checks: random and, when given, real images."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = [("random", torch.randn(b, *input_size, generator=g)) for b in cfg.batches()]
    if real is not None:
        for b in cfg.batches():
            if len(real) >= b:
                out.append(("real", real[:b].float().contiguous()))
    return out


def export_onnx(model: nn.Module, out_path: str | os.PathLike, *, input_size: Sequence[int],
                config: ExportConfig | None = None, verify_data: torch.Tensor | None = None,
                verify_labels: torch.Tensor | None = None, metadata: dict[str, str] | None = None,
                calibration_data: torch.Tensor | None = None, **options: Any) -> ExportResult:
    """Export `model` to a verified ONNX file at `out_path` (plus requested variants and report).

    `input_size` is (C, H, W) or (H, W); `options` override fields of `config` (ExportConfig);
    `verify_data` is a float batch of real, preprocessed images (labels optional: then every fp16 /
    int8 file is gated on its top-1 accuracy vs fp32's); `calibration_data` (preprocessed training
    images) calibrates `int8="static"`."""
    cfg = _resolve_config(config, options)
    if cfg.int8 == "static" and (calibration_data is None or len(calibration_data) == 0):
        raise ExportError("--int8 static needs calibration images: pass --data SPEC (its training images calibrate "
                          "the activations)")
    if cfg.format == "openvino" and importlib.util.find_spec("openvino") is None:
        raise ExportError("--format openvino needs openvino: pip install 'p3b-deploy[openvino]'")
    if cfg.format == "executorch":
        from ..executorch_io import unavailable
        reason = unavailable()
        if reason:
            raise ExportError(f"--format executorch: {reason}")
    input_size = _input_size(input_size)
    opset = cfg.resolved_opset()
    _check_opset(opset)
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise ExportError(f"output must end in .onnx: {out}")
    try:
        _check_parent(out)
    except P3BError as e:
        raise ExportError(str(e)) from None
    model = model.eval()
    meta = dict(metadata) if metadata is not None else _default_metadata(model)
    meta.setdefault("tool", "p3b-deploy")
    meta.setdefault("tool_version", __version__)
    meta.setdefault("input_size", json.dumps(list(input_size)))
    meta["precision"] = "fp32"
    meta["opset"] = str(opset)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        return _export_in(tmpdir, model, out, input_size, cfg, meta, verify_data, verify_labels, calibration_data)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _default_metadata(model: nn.Module) -> dict[str, str]:
    """metadata_for a timm ViT (dense or slim); any other module gets the tool keys only."""
    try:
        return metadata_for(model, source=type(model).__name__)
    except (P3BError, AttributeError):  # not a timm ViT (no describe(), no patch_embed)
        return {}


def _resolve_config(config: ExportConfig | None, options: dict[str, Any]) -> ExportConfig:
    names = {f.name for f in fields(ExportConfig)}
    bad = sorted(set(options) - names)
    if bad:
        raise TypeError(f"export_onnx got unknown options {bad}")
    cfg = ExportConfig(**{**(asdict(config) if config else {}), **options})
    if cfg.static_batch is not None:
        if int(cfg.static_batch) < 1:
            raise ExportError(f"static batch must be >= 1, got {cfg.static_batch}")
        cfg.dynamic_batch = False
    elif not cfg.dynamic_batch:
        raise ExportError("dynamic_batch=False needs static_batch")
    if cfg.int8 is True or cfg.int8 is False:  # config files / the Python API may say int8=true
        cfg.int8 = "dynamic" if cfg.int8 else None
    if cfg.int8 not in (None, *INT8_MODES):
        raise ExportError(f"int8 must be one of {INT8_MODES}, got {cfg.int8!r}")
    if cfg.format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    if int(cfg.executorch_max_batch) < 1:
        raise ExportError(f"executorch max batch must be >= 1, got {cfg.executorch_max_batch}")
    if not 0.0 <= cfg.int8_max_drop <= 100.0:
        raise ExportError(f"int8 max drop must be a percentage in [0, 100], got {cfg.int8_max_drop}")
    if cfg.triton_backend not in ("onnxruntime", "python"):  # refused before the (slow) export
        raise ExportError(f"Triton backend must be onnxruntime or python, got {cfg.triton_backend!r}")
    if cfg.triton_instances < 1 or cfg.triton_threads < 0:
        raise ExportError("Triton instances must be >= 1 and threads per instance >= 0 (0 = ORT's default)")
    cfg.verify_batches = tuple(int(b) for b in cfg.verify_batches)
    return cfg


def _input_size(size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        size = (3, *size)
    if len(size) != 3 or min(size) < 1:
        raise ExportError(f"input size must be (C, H, W) or (H, W), got {size}")
    return size  # type: ignore[return-value]


def _export_in(tmpdir: Path, model: nn.Module, out: Path, input_size: tuple[int, int, int],
               cfg: ExportConfig, meta: dict[str, str], real: torch.Tensor | None,
               labels: torch.Tensor | None, calibration: torch.Tensor | None) -> ExportResult:
    fp32 = tmpdir / out.name
    example = torch.randn(cfg.static_batch or 2, *input_size, generator=torch.Generator().manual_seed(cfg.seed))
    t0 = time.perf_counter()
    exporter, reason = _torch_export(model, fp32, example, cfg.resolved_opset(), cfg.dynamic_batch)
    seconds = time.perf_counter() - t0
    if reason:
        meta["exporter_fallback"] = reason
    meta["exporter"] = exporter
    opset, scopes = _finish_graph(fp32, meta, cfg.strip_node_metadata)
    if cfg.simplify:
        _simplify(fp32)
    inputs = _make_inputs(cfg, input_size, real)
    parity = verify_onnx(fp32, model, inputs, tol=cfg.tol, threads=cfg.threads)
    parity.path = str(out)
    parity.raise_if_failed()
    graph = graph_report(fp32, input_size, scopes, cfg)
    notes: list[str] = []
    variants = _variants(tmpdir, fp32, out, model, input_size, cfg, real, labels, calibration, notes)
    final_meta = _read_metadata(fp32)
    ir = _openvino(tmpdir, fp32, out, model, inputs, final_meta, cfg) if cfg.format == "openvino" else None
    pte = _executorch(tmpdir, out, model, input_size, inputs, final_meta, cfg) if cfg.format == "executorch" else None
    report = out.with_name(out.stem + ".export.json")
    result = ExportResult(
        path=out, opset=opset, exporter=exporter, fallback_reason=reason, input_size=input_size,
        dynamic_batch=cfg.dynamic_batch, size_bytes=fp32.stat().st_size, parity=parity, graph=graph,
        metadata=final_meta, variants=variants, report_path=report, config=cfg,
        export_seconds=round(seconds, 2), simplified=cfg.simplify, openvino=ir, executorch=pte, notes=notes)
    if cfg.triton_repo:
        result.triton_dir = _triton(fp32, out, input_size, final_meta, cfg)
    _publish(tmpdir, fp32, out, variants, report, result)
    return result


def _triton(fp32: Path, out: Path, input_size: tuple[int, int, int], meta: dict[str, str],
            cfg: ExportConfig) -> Path:
    import onnx
    from .triton import TritonConfig, triton_parameters, write_triton_repo
    dims = onnx.load(str(fp32), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    tc = TritonConfig(name=cfg.triton_name or out.stem, input_size=input_size, num_classes=int(dims[-1].dim_value),
                      max_batch_size=cfg.triton_max_batch, static_batch=cfg.static_batch,
                      backend=cfg.triton_backend, parameters=triton_parameters(meta),
                      instance_count=cfg.triton_instances, intra_op_threads=cfg.triton_threads)
    return write_triton_repo(fp32, cfg.triton_repo, tc)


def _openvino(tmpdir: Path, fp32: Path, out: Path, model: nn.Module, inputs: list[tuple[str, torch.Tensor]],
              meta: dict[str, str], cfg: ExportConfig):
    """<stem>.xml/.bin in tmpdir, verified against torch at the parity batches (f32 inference)."""
    from .openvino_ir import verify_ir, write_ir
    xml = tmpdir / (out.stem + ".xml")
    write_ir(fp32, xml, meta)
    ref = [(label, x.numpy(), _torch_logits(model, x)) for label, x in inputs]
    ir = verify_ir(xml, ref, cfg.tol, cfg.threads)
    ir.xml = out.with_suffix(".xml")
    return ir


def _executorch(tmpdir: Path, out: Path, model: nn.Module, input_size: tuple[int, int, int],
                inputs: list[tuple[str, torch.Tensor]], meta: dict[str, str], cfg: ExportConfig):
    """<stem>.pte in tmpdir (XNNPACK fp32), verified against torch at the parity batches."""
    from .executorch_pte import verify_pte, write_pte
    _log.info("lowering to ExecuTorch (XNNPACK); this takes about a minute for a small model")
    res = write_pte(model, tmpdir / (out.stem + ".pte"), input_size,
                    cfg.static_batch or int(cfg.executorch_max_batch), cfg.dynamic_batch, meta)
    ref = [(label, x.numpy(), _torch_logits(model, x)) for label, x in inputs]
    verify_pte(res, ref, cfg.tol, cfg.threads)
    res.path = out.with_suffix(".pte")
    return res


def _publish(tmpdir: Path, fp32: Path, out: Path, variants: list[VariantResult], report: Path,
             result: ExportResult) -> None:
    """Move verified files into place: variants, IR and report first, the main file last."""
    moved = [v.path for v in variants]
    if result.openvino is not None:
        moved += [out.with_suffix(".xml"), out.with_suffix(".bin")]
    if result.executorch is not None:
        moved.append(out.with_suffix(".pte"))
    for p in moved:
        os.replace(tmpdir / p.name, p)
    write_json(report, result.to_dict())
    for p in (report, fp32, *moved):
        os.chmod(p, 0o644)  # temp files are created 0600; shipped artifacts are world-readable
    os.replace(fp32, out)


def _read_metadata(path: Path) -> dict[str, str]:
    import onnx
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ============================================================================ verification
def _run_ort(sess: Any, x: torch.Tensor, io_dtype: np.dtype = np.float32) -> np.ndarray:
    return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(io_dtype)})[0], dtype=np.float64)


@torch.no_grad()
def _torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    out = _Logits(model).eval()(x)
    return out.double().numpy()


def _agreement(ref: np.ndarray, got: np.ndarray, tie: float = 0.0) -> float:
    """Percent of rows with the same argmax; rows whose reference top-2 margin is <= `tie` count
    as agreeing (a difference within the tolerance may legitimately flip an exact tie)."""
    same = ref.argmax(1) == got.argmax(1)
    if tie > 0 and ref.shape[1] > 1:
        top2 = np.sort(ref, axis=1)[:, -2:]
        same |= (top2[:, 1] - top2[:, 0]) <= tie
    return 100.0 * float(same.mean())


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
        ref, got = _torch_logits(model, x), _run_ort(sess, x)
        if got.shape != ref.shape:
            rep.failures.append(f"{label} batch {len(x)}: output shape {got.shape}, torch {ref.shape}")
            continue
        diff = float(np.abs(got - ref).max())
        agr = _agreement(ref, got, tie=2 * tol)
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
def _variants(tmpdir: Path, fp32: Path, out: Path, model: nn.Module, input_size: tuple[int, int, int],
              cfg: ExportConfig, real: torch.Tensor | None, labels: torch.Tensor | None,
              calibration: torch.Tensor | None, notes: list[str]) -> list[VariantResult]:
    """fp16 / int8 files, each verified (and refused) before anything is published."""
    result: list[VariantResult] = []
    if not (cfg.fp16 or cfg.int8):
        return result
    if real is not None:
        agree_x, data = real, "real"
    else:
        agree_x, data = torch.randn(cfg.agreement_images, *input_size,
                                    generator=torch.Generator().manual_seed(cfg.seed + 1)), "random"
        notes.append(f"no --data: the fp16/int8 files were gated on top-1 agreement with fp32 on "
                     f"{cfg.agreement_images} random images only, a weak check of accuracy; pass --data for a "
                     "val top-1 gate")
    sess32, _ = _open(fp32, None, session_options(cfg.threads))
    ref = _batched(lambda x: _run_ort(sess32, x), agree_x)
    for precision in [p for p, on in (("fp16", cfg.fp16), ("int8", cfg.int8)) if on]:
        name = f"{out.stem}.{precision}.onnx"
        path = tmpdir / name
        mode = cfg.int8 if precision == "int8" else None
        if precision == "fp16":
            _to_fp16(fp32, path, cfg)
        elif mode == "static":
            _to_int8_static(fp32, path, calibration)
        else:
            _to_int8(fp32, path, cfg)
        _set_metadata(path, {"precision": precision, **({"quantization": mode} if mode else {})})
        rep = _verify_variant(path, precision, model, ref, agree_x, data, labels, cfg, input_size)
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
        for label, x in _make_inputs(cfg, input_size, agree_x if data == "real" else None):
            ref, got = _torch_logits(model, x), _run_ort(sess, x, io)
            bound = cfg.fp16_rtol * max(1.0, float(np.abs(ref).max()))
            diff = float(np.abs(got - ref).max())
            rep.cases.append(ParityCase(label, len(x), diff, bound, _agreement(ref, got), None, diff <= bound))
            if diff > bound:
                rep.failures.append(f"{label} batch {len(x)}: max |diff| {diff:.3e} > {bound:.3e}")
    got = _batched(lambda x: _run_ort(sess, x, io), agree_x)
    agr = _agreement(ref32, got)
    diff = float(np.abs(got - ref32).max())
    case = ParityCase(f"{data} (agreement vs fp32 ONNX)", len(agree_x), diff, None, agr, None, ok=True)
    rep.cases.append(case)
    hint = " (raise --int8-max-drop to accept)" if precision == "int8" else ""
    if labels is not None:
        y = labels.numpy()
        case.top1_fp32 = 100.0 * float((ref32.argmax(1) == y).mean())
        case.top1 = 100.0 * float((got.argmax(1) == y).mean())
        case.max_drop = cfg.int8_max_drop if precision == "int8" else 100.0 - cfg.fp16_min_agreement
        case.ok = case.top1_fp32 - case.top1 <= case.max_drop
        if not case.ok:
            rep.failures.append(f"val top-1 {case.top1:.2f}% is {case.top1_fp32 - case.top1:.2f} points below fp32's "
                                f"{case.top1_fp32:.2f}% on {len(y)} images (at most {case.max_drop:g} allowed){hint}")
        return rep
    if precision == "int8" or data == "real":
        case.top1_required = cfg.fp16_min_agreement if precision == "fp16" else 100.0 - cfg.int8_max_drop
        case.ok = agr >= case.top1_required
        if not case.ok:
            rep.failures.append(f"top-1 agreement with fp32 is {agr:.1f}% on {len(agree_x)} {data} images, "
                                f"below the required {case.top1_required:.1f}%{hint}")
    return rep


# ============================================================================ sources and metadata
@dataclass
class Source:
    """A model to export, resolved from a slim dir, a run dir or a timm name."""
    model: nn.Module  # eval-mode module (slim or dense)
    kind: str  # 'slim_dir', 'run_dir' or 'timm'
    name: str  # what the user passed (path or timm name)
    input_size: tuple[int, int, int]  # C, H, W the model was built for


def load_source(source: str, *, residual_io: str = "index", checkpoint: str | None = None,
                pretrained: bool = False, num_classes: int | None = None, img_size: int | None = None,
                patch_size: int | None = None) -> Source:
    """SLIM_DIR, RUN_DIR (slimmed here with `residual_io`) or a timm model name (the dense
    baseline, with the usual options); detection by `p3b_deploy.artifacts.resolve`."""
    from ..artifacts import resolve
    from ..models.vit import preprocessing_of
    art = resolve(source, ("slim", "run", "timm"))
    if art.kind != "timm":
        given = [k for k, v in (("checkpoint", checkpoint), ("pretrained", pretrained), ("num_classes", num_classes),
                                ("img_size", img_size), ("patch_size", patch_size)) if v]
        if given:
            raise ExportError(f"model options {given} apply to a timm model name, not to the folder {art.path}")
    if art.kind == "slim":
        model = art.load()
    elif art.kind == "run":
        model = art.slim(residual_io=residual_io)
    else:
        model = art.load(checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes,
                         img_size=img_size, patch_size=patch_size)
    size = tuple(preprocessing_of(model)["input_size"])
    kind = {"slim": "slim_dir", "run": "run_dir", "timm": "timm"}[art.kind]
    return Source(model=model.eval(), kind=kind, name=str(source), input_size=size)  # type: ignore[arg-type]


def real_images(spec: str, model: nn.Module, n: int = 256, root: str | None = None, download: bool = False,
                workers: int | None = None, calibration: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """Up to `n` preprocessed validation images + labels + class names for verification, and
    `calibration` preprocessed training images (no augmentation; None when 0) for static int8."""
    from ..data import InputConfig, build_loaders
    from ..models.vit import preprocessing_of
    pre = preprocessing_of(model)
    c, h, w = pre["input_size"]
    icfg = InputConfig(size=(h, w), mean=tuple(pre.get("mean") or (0.5,) * c), std=tuple(pre.get("std") or (0.5,) * c),
                       interpolation=pre.get("interpolation") or "bilinear",
                       crop_pct=float(pre.get("crop_pct") or 1.0), in_chans=c)
    bundle = build_loaders(spec, input_cfg=icfg, batch_size=64, eval_batch_size=64, root=root,
                           download=download, workers=workers, augment=False)
    x, y = _take(bundle.val, n)
    return x, y, list(bundle.class_names), _take(bundle.train, calibration)[0] if calibration > 0 else None


def _take(loader: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, have = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= n:
            break
    return torch.cat(xs)[:n].float(), torch.cat(ys)[:n]


def export_source(source: str, out_path: str | os.PathLike, *, config: ExportConfig | None = None,
                  model_options: dict[str, Any] | None = None, data: str | None = None,
                  data_options: dict[str, Any] | None = None, verify_images: int = 256) -> ExportResult:
    """The `export` stage: resolve SOURCE, gather real images if `data` is given, export + verify."""
    config = None if config is None else config.for_target()
    src = load_source(source, **(model_options or {}))
    x = y = names = calib = None
    n_calib = config.calibration_images if config is not None and config.int8 == "static" else 0
    if data:
        x, y, names, calib = real_images(data, src.model, verify_images, calibration=n_calib, **(data_options or {}))
        if len(names) != int(src.model.num_classes):
            names = None  # the data set's classes are not the model's head
            y = None
    meta = metadata_for(src.model, source, class_names=names)
    return export_onnx(src.model, out_path, input_size=src.input_size, config=config,
                       verify_data=x, verify_labels=y, metadata=meta, calibration_data=calib)
