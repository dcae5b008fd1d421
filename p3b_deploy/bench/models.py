"""What a benchmark MODEL argument is, and how to get an ONNX file or a torch module from it.

A MODEL is an .onnx file, an ExecuTorch .pte file (`export --format executorch`), a LiteRT .tflite
file (`export --format litert`), a slim dir (config.json + model.safetensors), a run dir (plan.json +
model.safetensors), a timm model name (dense baseline, random weights unless a checkpoint is
given elsewhere), or an `nn.Module` passed through the Python API. Only the last four (and a
.pte) need torch; an .onnx file is resolved with onnxruntime (+ onnx for MAC counting) alone.
The `executorch` backend runs a .pte, lowering one from a torch model on demand (minutes). The
`litert` backend runs a .tflite (given, or the one next to the .onnx), torch-free.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BenchError, P3BError


@dataclass
class ModelSource:
    """One model under test, resolved lazily (torch is imported only when a module is needed)."""
    label: str  # name used in the reports
    kind: str  # "onnx", "pte", "tflite", "slim", "run", "timm" or "module"
    origin: str  # the MODEL argument as given (path or name)
    onnx_path: str | None = None  # the .onnx file (given, or exported on demand)
    pte_path: str | None = None  # the ExecuTorch .pte (given, or lowered on demand)
    pte_max_batch: int | None = None  # largest batch the .pte runs
    tflite_path: str | None = None  # the LiteRT .tflite (given, or next to the .onnx)
    macs: int | None = None  # MACs per image from the model's own counter
    params: int | None = None  # parameters from the model's own counter
    counter: str | None = None  # which counter gave macs/params
    onnx_counts: dict[str, Any] | None = None  # count_onnx(...).to_dict() when an ONNX file exists
    input_shape: tuple[int, int, int] | None = None  # (C, H, W)
    notes: list[str] = field(default_factory=list)  # anything the reader should know
    _module: Any = None  # the torch module once built

    def info(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "origin": self.origin, "onnx_path": self.onnx_path,
                "pte_path": self.pte_path, "tflite_path": self.tflite_path,
                "macs": self.macs, "params": self.params, "counter": self.counter,
                "onnx_counts": self.onnx_counts, "input_shape": list(self.input_shape or ()), "notes": self.notes}

    # ---------------------------------------------------------------- torch side
    def module(self):
        """The torch module (built on first use); BenchError for an .onnx file."""
        if self.kind in ("onnx", "pte", "tflite"):
            raise BenchError(f"torch backends need a torch model; this MODEL is an .{self.kind} file")
        if self._module is None:
            self._module = _build_module(self.kind, self.origin)
            self._count_torch()
        return self._module

    def _count_torch(self) -> None:
        m = self._module
        self.params = int(sum(p.numel() for p in m.parameters()))
        if self.input_shape is None:
            self.input_shape = _module_input_shape(m)
        cfg = getattr(m, "p3b_slim_config", None)
        if cfg is not None and cfg.macs.get("slim"):
            self.macs, self.counter = int(cfg.macs["slim"]), "plan (p3b_deploy.spec analytic, via SlimConfig)"
            return
        try:
            from ..models.vit import count_model
            self.macs, self.counter = int(count_model(m).macs), "p3b_deploy.spec analytic (dense)"
            if count_model(m).params != self.params:  # describe() saw a non-standard module
                raise BenchError("structure does not match timm ViT dims")
        except P3BError:
            self.macs, self.counter = _flop_counter_macs(m, self.input_shape), "torch FlopCounterMode"

    # ---------------------------------------------------------------- ONNX side
    def ensure_onnx(self, work_dir: Path) -> str:
        """Path of an ONNX file for this model, exporting it into `work_dir` if needed."""
        if self.onnx_path is None:
            if self.kind in ("pte", "tflite"):
                raise BenchError(f"ONNX backends need an .onnx file; {Path(self.origin).name} has no "
                                 f"{Path(self.origin).with_suffix('.onnx').name} next to it")
            module = self.module()
            out = work_dir / f"{_safe(self.label)}.onnx"
            _export(module, out, self.input_shape)
            self.onnx_path = str(out)
        if self.onnx_counts is None:
            self._count_onnx()
        return self.onnx_path

    # ---------------------------------------------------------------- ExecuTorch side
    def ensure_pte(self, work_dir: Path, batch: int) -> str:
        """Path of a .pte running `batch`, lowering the torch module into `work_dir` if needed
        (dynamic batch up to max(32, batch); about a minute for a small model)."""
        if self.kind == "onnx":
            sib = Path(self.origin).with_suffix(".pte")
            if not sib.is_file():
                raise BenchError(f"ExecuTorch lowers from torch, not ONNX: export with --format executorch (writes "
                                 f"{sib.name} next to the .onnx), or give a slim dir, run dir or timm name")
            self.pte_path = str(sib)
        if self.kind not in ("onnx", "pte") and (self.pte_path is None or (self.pte_max_batch or 0) < batch):
            from ..executorch_io import lower
            module = self.module()
            max_batch = max(32, batch)
            out = work_dir / f"{_safe(self.label)}.b{max_batch}.pte"
            try:
                out.write_bytes(lower(module, self.input_shape, max_batch).buffer)
            except P3BError as e:
                raise BenchError(str(e)) from None
            self.pte_path, self.pte_max_batch = str(out), max_batch
        return self.pte_path

    # ---------------------------------------------------------------- LiteRT side
    def ensure_tflite(self) -> str:
        """Path of the .tflite: the MODEL itself, or the one `export --format litert` wrote next to
        the .onnx (LiteRT converts from torch, so bench converts nothing: export first)."""
        if self.tflite_path is None:
            sib = Path(self.origin).with_suffix(".tflite")
            if self.kind != "onnx" or not sib.is_file():
                raise BenchError(f"the litert backend runs a .tflite: export with --format litert (writes "
                                 f"{sib.name if self.kind == 'onnx' else '<stem>.tflite'} next to the .onnx) and "
                                 "bench the .onnx or the .tflite")
            self.tflite_path = str(sib)
        return self.tflite_path

    def _count_onnx(self) -> None:
        """Graph MACs (always recorded); the export's analytic metadata wins for `macs` when present."""
        from .onnx_macs import count_onnx
        try:
            c = count_onnx(self.onnx_path)
            self.onnx_counts, meta = c.to_dict(), c.metadata
        except BenchError as e:  # no `onnx` package (edge) or unreadable file: metadata via ORT only
            self.notes.append(str(e))
            c, meta = None, _ort_metadata(self.onnx_path)
        if self.macs is None and _int(meta.get("macs")) is not None:
            self.macs, self.params = _int(meta["macs"]), _int(meta.get("params"))
            self.counter = "p3b_deploy.spec analytic (from the ONNX file's metadata)"
        elif self.macs is None and c is not None:
            self.macs, self.params, self.counter = c.macs, c.params, "onnx graph (p3b_deploy.bench.onnx_macs)"
        if self.input_shape is None and meta.get("input_size"):
            try:
                self.input_shape = tuple(int(v) for v in json.loads(meta["input_size"]))
            except (ValueError, TypeError):
                pass


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _ort_metadata(path: str) -> dict[str, str]:
    from ..onnx_io import load_onnx_session
    try:
        return load_onnx_session(path)[1]
    except P3BError:
        return {}


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def resolve(model: Any, label: str | None = None) -> ModelSource:
    """Classify one MODEL argument (path, timm name or nn.Module) without loading it.

    A `(module, onnx_path)` pair is one model in both forms: torch backends time the module,
    ONNX Runtime backends the given (already verified) file instead of a fresh export."""
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], (str, os.PathLike)):
        src = resolve(model[0], label)
        if not Path(model[1]).is_file():
            raise BenchError(f"ONNX file not found: {model[1]}")
        src.onnx_path = str(model[1])
        return src
    if not isinstance(model, (str, os.PathLike)):
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(model, torch.nn.Module):
            raise BenchError(f"a MODEL must be a path, a timm name or an nn.Module, got {type(model).__name__}")
        src = ModelSource(label=label or type(model).__name__, kind="module", origin=type(model).__name__)
        src._module = model
        src._count_torch()
        return src
    from ..artifacts import ArtifactError, detect
    try:
        art = detect(model)
    except ArtifactError as e:
        raise BenchError(str(e)) from None
    if art.kind == "plan":
        raise BenchError(f"{art.path} is a plan on its own; bench needs a model (a run dir, slim dir, .onnx or timm name)")
    if art.kind in ("onnx", "pte"):  # a file that is not a model is refused before any timing
        try:
            art.check()
        except P3BError as e:
            raise BenchError(str(e)) from None
    if art.kind in ("pte", "tflite"):
        sib = art.onnx_sibling
        src = ModelSource(label=label or art.path.name, kind=art.kind, origin=str(art.path),
                          onnx_path=None if sib is None else str(sib), **{f"{art.kind}_path": str(art.path)})
        if sib is None:
            src.notes.append(f"no {art.onnx_name.name} next to the .{art.kind}: no parity against ORT")
        return src
    if art.kind == "onnx":
        name = label or (Path(str(model)).name if Path(str(model)).is_dir() else art.path.stem)
        return ModelSource(label=name, kind="onnx", origin=str(art.path), onnx_path=str(art.path))
    origin = str(model)
    return ModelSource(label=label or (art.path.name if art.kind != "timm" else origin), kind=art.kind, origin=origin)


def _build_module(kind: str, origin: str):
    from ..artifacts import detect
    if kind in ("timm", "slim", "run"):
        art = detect(origin)
        return art.slim() if kind == "run" else art.load()
    raise BenchError(f"cannot build a torch module from a {kind} model")


def _module_input_shape(m) -> tuple[int, int, int]:
    pe = getattr(m, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        h, w = (pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size,) * 2)
        return (int(pe.proj.in_channels), int(h), int(w))
    cfg = getattr(m, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])
    raise BenchError(f"cannot tell the input size of {type(m).__name__}")


def _flop_counter_macs(m, input_shape) -> int:
    """MACs per image of any module: torch's FlopCounterMode (matmuls, convs, SDPA) / 2."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    p = next(m.parameters())
    x = torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device)
    # the math SDPA path: FlopCounterMode has no formula for the fused CPU flash-attention op
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m.eval()(x)
    return int(fc.get_total_flops()) // 2


def register_converter(kind: str, fn: Callable[..., None]) -> None:
    """Plug in how a torch module becomes a file this harness can time: kind "onnx" takes
    fn(module, out_path, input_shape). The harness only times files; `p3b_deploy.deploy` (which
    sits above export/ and bench/) registers the package's verified exporter on import."""
    _CONVERTERS[kind] = fn


_CONVERTERS: dict[str, Callable[..., None]] = {}


def _export(module, out: Path, input_shape) -> None:
    fn = _CONVERTERS.get("onnx")
    if fn is None:
        raise BenchError("timing a torch model on an ONNX runtime needs its ONNX export: call "
                         "p3b_deploy.deploy.benchmark (or p3b_deploy.benchmark), or pass an exported .onnx file")
    fn(module, out, input_shape)
