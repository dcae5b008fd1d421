"""ONNX export that users can trust without opening the file: the orchestration.

`export_onnx(model, out, input_size=...)` writes the verified ONNX file (format `onnx`,
export/onnx_file.py: dynamo export, metadata, parity vs torch, graph report, fp16 / int8
variants) and, with `--format NAME`, the file of one more runtime next to it (export/formats.py:
one module per format behind write / verify / describe), then `<stem>.export.json` with every
number. Everything is built in a temp folder and moved into place only when all checks pass, so a
failed export leaves no file behind. `load_source` resolves a slim dir, a run dir or a timm name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .._version import __version__
from .config import FORMATS, INT8_MODES, ExportConfig
from .formats import Job, get_format
from .metadata import metadata_for
from .onnx_file import (INDEX_OPS, INPUT_NAME, MIN_OPSET, OUTPUT_NAME, GraphReport, ParityCase,  # noqa: F401
                        ParityReport, VariantResult, _check_opset, graph_report, profile_op_share, verify_onnx)
from .runtime_parity import make_inputs as _make_inputs  # noqa: F401  (tests reach it here)
from ..errors import ExportError, P3BError
from ..io import _check_parent, write_json


# ============================================================================ result
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
    outputs: dict[str, Any] = field(default_factory=dict)  # --format NAME -> its result (e.g. PteResult)
    notes: list[str] = field(default_factory=list)  # what the reader should know (e.g. a weak gate)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({name: d["outputs"].get(name) for name in FORMATS if name != "onnx"})
        del d["outputs"]
        d["metadata"] = {k: v for k, v in self.metadata.items() if k != "class_names"}
        names = json.loads(self.metadata.get("class_names", "null") or "null")
        d["metadata"]["class_names"] = None if names is None else f"({len(names)} names, in the ONNX file)"
        return json.loads(json.dumps(d, default=str))

    @property
    def openvino(self) -> Any:
        """openvino_ir.IRResult when --format openvino."""
        return self.outputs.get("openvino")

    @property
    def executorch(self) -> Any:
        """executorch_pte.PteResult when --format executorch."""
        return self.outputs.get("executorch")

    def summary(self) -> str:
        """A few lines for the CLI: parity, size, ops, then each further format's file."""
        lines = get_format("onnx").describe(self)
        for name, out in self.outputs.items():
            lines += get_format(name).describe(out)
        lines += [f"  note: {n}" for n in self.notes]
        if self.triton_dir:
            lines.append(f"  triton: {self.triton_dir}/config.pbtxt + 1/model.onnx")
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


# ============================================================================ export
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
    reason = get_format(cfg.format).unavailable(cfg)
    if reason:
        raise ExportError(reason)
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
    if cfg.litert_batches is not None:
        cfg.litert_batches = tuple(int(b) for b in cfg.litert_batches)
        if not cfg.litert_batches or min(cfg.litert_batches) < 1:
            raise ExportError(f"LiteRT batches must be >= 1, got {list(cfg.litert_batches)}")
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
    """The ONNX file first (every other format hands off from it or is checked next to it), then
    `--format`'s file; each written, then verified, before anything is published."""
    job = Job(model=model, out=out, tmpdir=tmpdir, input_size=input_size, cfg=cfg, metadata=meta,
              inputs=_make_inputs(cfg, input_size, real), real=real, labels=labels, calibration=calibration)
    onnx = get_format("onnx")
    main = onnx.verify(job, onnx.write(job))
    outputs: dict[str, Any] = {}
    if cfg.format != "onnx":
        fmt = get_format(cfg.format)
        outputs[fmt.name] = fmt.verify(job, fmt.write(job))
    report = out.with_name(out.stem + ".export.json")
    result = ExportResult(
        path=out, opset=main.opset, exporter=main.exporter, fallback_reason=main.fallback_reason,
        input_size=input_size, dynamic_batch=cfg.dynamic_batch, size_bytes=main.path.stat().st_size,
        parity=main.parity, graph=main.graph, metadata=main.metadata, variants=main.variants, report_path=report,
        config=cfg, export_seconds=main.export_seconds, simplified=cfg.simplify, outputs=outputs, notes=job.notes)
    if cfg.triton_repo:
        result.triton_dir = _triton(main.path, out, input_size, main.metadata, cfg)
    moved = onnx.files(out, main) + [p for name, r in outputs.items() for p in get_format(name).files(out, r)]
    _publish(tmpdir, main.path, out, moved, report, result)
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


def _publish(tmpdir: Path, fp32: Path, out: Path, moved: list[Path], report: Path, result: ExportResult) -> None:
    """Move verified files into place: variants, other formats' files and report first, the main file last."""
    for p in moved:
        os.replace(tmpdir / p.name, p)
    write_json(report, result.to_dict())
    for p in (report, fp32, *moved):
        os.chmod(p, 0o644)  # temp files are created 0600; shipped artifacts are world-readable
    os.replace(fp32, out)


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
    """The `export` stage: resolve SOURCE, gather real images if `data` is given, export + verify.
    A format (or target) that cannot be written here is refused before the model and the data are loaded."""
    config = None if config is None else config.for_target()
    reason = get_format(config.format if config is not None else "onnx").unavailable(config)
    if reason:
        raise ExportError(reason)
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
