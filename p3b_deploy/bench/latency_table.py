"""Latency table: per-branch latency by width, measured on the target device from a probe pack.

`measure_pack(pack, batch, threads, provider) -> LatencyTable` times every file of a probe pack
(`p3b-deploy latency-pack`) with the benchmark harness (one interleaved run: warm-up, rounds,
median), and `LatencyTable.predict(plan) -> ms` prices any plan of that geometry:

    predicted = fixed + sum over live branches of  a * (branch(width) [+ io cost if it reads/writes
                a subset of the residual dims]) + c;  a removed branch costs 0.

branch(width) is the probe's median minus the null graph's (per-run overhead), divided by the
branches per file, made monotone (pool-adjacent-violators) and interpolated piecewise-linearly
between grid widths. A branch with residual-dim pruning is priced at the width whose
full-residual branch has the same MACs, plus the measured cost of its index read / write (the
`*_io` probes at half the residual dims); that is a model, not a measurement of that exact shape.
(a, c) is the table's correction, fitted at table time: the pack's whole slim models of seeded
plans (random, P3B-shaped, knapsack-like with removed branches) and the dense model are timed in
the same interleaved run as the probes, and a (scale) and c (ms per live branch) are fitted to
their measured latency minus the fixed part on (sum of branch costs, number of live branches):
the plain sum (a = 1, c = 0), a scale alone, or both (non-negative least squares), whichever
predicts a held-out plan best (leave-one-out). It models what a sum of isolated branch costs misses on a
runtime (fusion across branches, per-op overhead, cache effects); a pack without such plans gives
a = 1, c = 0. Tables are measured for one deployment target (`p3b_deploy.targets`): the probes are
timed as that target runs them (int8 targets: every probe quantized with the export's recipe,
`onnx_quant`; OpenVINO at the target's precision; ExecuTorch / LiteRT, which run no ONNX: every
probe rebuilt from the pack's manifest and lowered with the export's writers, `export.edge_probes`,
cached in the pack), and the table records the target's name, so that a table of one target is
refused for another.
The file owns its format (`p3b-latency-table`, version 1) and is validated on load and before
every save. This module imports no torch: it runs on a device with onnxruntime and numpy only
(lowering edge probes imports torch, inside `edge_probes`).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._version import __version__
from ..errors import P3BError
from ..io import read_json, write_json
from ..targets import TARGETS, Target, get_target

FORMAT, VERSION = "p3b-latency-table", 1
PACK_FORMAT, PACK_VERSION = "p3b-latency-pack", 1
KINDS = ("attn", "mlp")
_PROVIDERS = {"cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "ort-tensorrt"}
# tables written before targets existed: the target their provider timed
_LEGACY_TARGET = {"CPUExecutionProvider": "ort-fp32", "openvino": "openvino-f32"}


class LatencyTableError(P3BError):
    """A latency table or probe pack that is missing, malformed, or for another model geometry."""


@dataclass(frozen=True)
class Geometry:
    """What a latency table is valid for: the model's structure and token count."""
    model: str  # timm name the pack was made from (informational)
    img_size: int  # input side
    embed_dim: int  # D
    depth: int  # layers
    num_heads: int  # H
    head_dim: int  # channels per head
    mlp_hidden: int  # MLP hidden width
    num_tokens: int  # sequence length N (patches + prefix tokens)
    num_classes: int  # classifier outputs of the pack's head (priced in the fixed part)

    STRUCT = ("embed_dim", "depth", "num_heads", "head_dim", "mlp_hidden", "num_tokens")

    @classmethod
    def from_spec(cls, spec: Any) -> "Geometry":
        """From a ViTSpec."""
        return cls(model=spec.name, img_size=int(spec.img_size[0]), embed_dim=spec.embed_dim, depth=spec.depth,
                   num_heads=spec.num_heads, head_dim=spec.head_dim, mlp_hidden=spec.mlp_hidden,
                   num_tokens=spec.num_tokens, num_classes=spec.num_classes)

    @classmethod
    def from_dict(cls, d: Any, where: str = "latency table") -> "Geometry":
        if not isinstance(d, dict):
            raise LatencyTableError(f"{where}: 'geometry' must be an object")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise LatencyTableError(f"{where}: geometry lacks {', '.join(missing)}")
        vals = {f.name: d[f.name] for f in fields(cls)}
        for k, v in vals.items():
            if k != "model" and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "num_classes" else 1)):
                raise LatencyTableError(f"{where}: geometry {k} must be a positive integer, got {v!r}")
        return cls(**vals)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, other: "Geometry") -> str | None:
        """'' when structurally equal, else which fields differ (model name and classes do not matter)."""
        diff = [f"{k} {getattr(self, k)} vs {getattr(other, k)}" for k in self.STRUCT
                if getattr(self, k) != getattr(other, k)]
        return ", ".join(diff) or None


# --------------------------------------------------------------------------------------------
# Monotone curves
# --------------------------------------------------------------------------------------------
def isotonic(values: Sequence[float]) -> list[float]:
    """Non-decreasing least-squares fit (pool adjacent violators): measured noise that makes a wider
    branch look faster than a narrower one is averaged away instead of kept."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out: list[float] = []
    for m, c in blocks:
        out += [m] * int(c)
    return out


@dataclass
class Curve:
    """Latency (ms) of one branch kind by kept width; monotone, piecewise-linear between grid points."""
    widths: list[int]  # ascending grid widths (the last is the dense width)
    ms: list[float]  # monotone latency per branch at each width
    raw_ms: list[float] = field(default_factory=list)  # as measured, before the monotone fit

    def __call__(self, width: Any) -> Any:
        """Latency at `width` (scalar or array); 0 where width <= 0 (removed branch), clamped to the grid."""
        w = np.asarray(width, dtype=np.float64)
        y = np.interp(np.clip(w, self.widths[0], self.widths[-1]), self.widths, self.ms)
        y = np.where(w <= 0, 0.0, y)
        return float(y) if y.ndim == 0 else y


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
@dataclass
class LatencyTable:
    """Per-branch latency by width on one device / provider / batch / threads (see module doc)."""
    geometry: Geometry  # model structure the table is valid for
    batch: int  # batch size of every timed run
    threads: int | None  # ORT intra-op threads (None = ORT default)
    provider: str  # ONNX Runtime execution provider timed
    curves: dict[str, Curve]  # "attn" / "mlp" -> latency per branch by width
    fixed_ms: float  # never-pruned part (patch embed, tokens, final norm, head), incl. one run's overhead
    io_ms: dict[str, float]  # extra cost of a branch reading and writing a subset of the residual dims
    dense_check: dict[str, float]  # measured_ms of the dense model, predicted_ms, error (pred/meas - 1)
    device: dict[str, Any] = field(default_factory=dict)  # CPU / GPU names, platform
    versions: dict[str, str] = field(default_factory=dict)  # onnxruntime, numpy, ...
    date: str = ""  # when measured (UTC, ISO)
    overhead_ms: float = 0.0  # null graph's median (subtracted from the probes)
    repeats: int = 1  # branches per probe file
    settings: dict[str, Any] = field(default_factory=dict)  # timing settings of the run
    tool_version: str = __version__  # p3b-deploy that measured it
    target: str = ""  # deployment target timed (p3b_deploy.targets name; "" = a provider with no target name)
    correction: dict[str, Any] = field(default_factory=dict)  # scale, per_branch_ms (+ fit record); {} = none

    @property
    def scale(self) -> float:
        return float(self.correction.get("scale", 1.0))

    @property
    def per_branch_ms(self) -> float:
        return float(self.correction.get("per_branch_ms", 0.0))

    # ---------------------------------------------------------------- prediction
    def branch_ms(self, kind: str, dims: Any) -> float:
        """Latency of one live branch with kept dims (spec.AttnDims / spec.MlpDims); 0 for None."""
        if dims is None:
            return 0.0
        g = self.geometry
        D, N, H = g.embed_dim, g.num_tokens, g.num_heads
        if kind == "attn":
            macs = dims.heads * (dims.n_in * (2 * dims.qk + dims.v) + dims.v * dims.n_out + N * (dims.qk + dims.v))
            width = macs / (H * (4 * D + 2 * N))
        else:
            width = dims.hidden * (dims.n_in + dims.n_out) / (2 * D)
        io = ((dims.n_in < D) + (dims.n_out < D)) / 2 * self.io_ms[kind]
        return self.scale * (float(self.curves[kind](max(width, 1e-9))) + io) + self.per_branch_ms

    def width_ms(self, kind: str, width: Any) -> Any:
        """Latency of one branch of `kind` (no residual-dim pruning) at inner width(s) `width`,
        correction included; 0 where width <= 0 (removed)."""
        w = np.asarray(width, dtype=np.float64)
        y = np.where(w <= 0, 0.0, self.scale * np.asarray(self.curves[kind](w)) + self.per_branch_ms)
        return float(y) if y.ndim == 0 else y

    def predict_dims(self, kept: Sequence[tuple[Any, Any]]) -> float:
        """Predicted latency (ms, one run of `batch` images) from per-layer (AttnDims|None, MlpDims|None)."""
        if len(kept) != self.geometry.depth:
            raise LatencyTableError(f"plan has {len(kept)} layers, the latency table's model {self.geometry.depth}")
        return self.fixed_ms + sum(self.branch_ms("attn", a) + self.branch_ms("mlp", m) for a, m in kept)

    def predict(self, plan: Any) -> float:
        """Predicted latency (ms) of the slim model of `plan` (a Plan); refuses another geometry."""
        self.check_plan(plan)
        return self.predict_dims(plan.kept_dims())

    @property
    def dense_ms(self) -> float:
        """Predicted dense latency: fixed part + every branch at full width."""
        g = self.geometry
        return self.fixed_ms + g.depth * (self.width_ms("attn", g.head_dim) + self.width_ms("mlp", g.mlp_hidden))

    def check_target(self, target: str | Target) -> None:
        """Refuse pricing for another deployment target than the one this table was timed on."""
        name = target.name if isinstance(target, Target) else get_target(target).name
        if self.target != name:
            raise LatencyTableError(
                f"latency table was timed on {self.target or self.provider!r}, not on target {name!r}: measure one "
                f"for it (p3b-deploy latency-table PACK --target {name} --out FILE)")

    def check_plan(self, plan: Any) -> None:
        g, d = self.geometry, plan.dims
        theirs = (d.get("embed_dim"), d.get("depth"), d.get("num_heads"), d.get("head_dim"), d.get("mlp_hidden"),
                  plan.img_size)
        ours = (g.embed_dim, g.depth, g.num_heads, g.head_dim, g.mlp_hidden, g.img_size)
        if theirs != ours:
            raise LatencyTableError(
                f"latency table is for {g.model} (D {g.embed_dim}, depth {g.depth}, {g.num_heads} heads x "
                f"{g.head_dim}, hidden {g.mlp_hidden}, input {g.img_size}); the plan's {plan.model} has D "
                f"{theirs[0]}, depth {theirs[1]}, {theirs[2]} heads x {theirs[3]}, hidden {theirs[4]}, input {theirs[5]}")

    def check_spec(self, spec: Any) -> None:
        """Refuse a model (ViTSpec) whose structure or token count differs from the table's."""
        mine, theirs = self.geometry, Geometry.from_spec(spec)
        if mine.mismatch(theirs):
            at = lambda g: f"{g.model} at {g.img_size} px ({g.num_tokens} tokens)"  # noqa: E731
            struct = replace(mine, num_tokens=theirs.num_tokens).mismatch(theirs)
            raise LatencyTableError(f"latency table does not fit the model: it was measured for {at(mine)}, the "
                                    f"model is {at(theirs)}" + (f"; structure {struct} (table vs model)" if struct else "")
                                    + f"; time a pack made for this model (latency-pack {spec.name} "
                                    f"--img-size {theirs.img_size})")

    def target_ms(self, target: str | float) -> float:
        """A latency target: '12ms' / '12 ms' is absolute, a bare number in (0, 1] a fraction of dense_ms."""
        text = str(target).strip().lower()
        try:
            if text.endswith("ms"):
                ms = float(text[:-2])
            else:
                frac = float(text)
                if not 0.0 < frac <= 1.0:
                    raise LatencyTableError(f"latency target {target!r}: a fraction must lie in (0, 1]; "
                                            "write milliseconds as e.g. '12ms'")
                ms = frac * self.dense_ms
        except ValueError:
            raise LatencyTableError(f"latency target must be a fraction of the dense latency (e.g. 0.5) or "
                                    f"milliseconds (e.g. 12ms), got {target!r}") from None
        if not math.isfinite(ms) or ms <= self.fixed_ms:
            raise LatencyTableError(f"latency target {ms:.3g} ms is not above the never-pruned part's "
                                    f"{self.fixed_ms:.3g} ms on this device; nothing could meet it")
        return ms

    # ---------------------------------------------------------------- file format
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "tool_version": self.tool_version, "date": self.date,
                "geometry": self.geometry.to_dict(), "target": self.target, "correction": self.correction,
                "device": self.device, "provider": self.provider,
                "versions": self.versions, "batch": self.batch, "threads": self.threads, "repeats": self.repeats,
                "branches": {k: {"widths": c.widths, "ms": c.ms, "raw_ms": c.raw_ms} for k, c in self.curves.items()},
                "fixed_ms": self.fixed_ms, "io_ms": self.io_ms, "overhead_ms": self.overhead_ms,
                "dense_check": self.dense_check, "settings": self.settings}

    @classmethod
    def from_dict(cls, d: Any, where: str = "latency table") -> "LatencyTable":
        """Parse and validate; LatencyTableError (one line) for anything malformed."""
        if not isinstance(d, dict):
            raise LatencyTableError(f"{where}: not a JSON object")
        if d.get("format") != FORMAT:
            raise LatencyTableError(f"{where}: not a latency table (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") != VERSION:
            raise LatencyTableError(f"{where}: unsupported version {d.get('version')!r} (this tool reads {VERSION})")
        missing = [k for k in ("geometry", "provider", "batch", "branches", "fixed_ms", "io_ms", "dense_check")
                   if k not in d]
        if missing:
            raise LatencyTableError(f"{where}: missing key(s) {', '.join(missing)}")
        geo = Geometry.from_dict(d["geometry"], where)
        br = d["branches"]
        if not isinstance(br, dict) or set(KINDS) - set(br):
            raise LatencyTableError(f"{where}: 'branches' needs entries {', '.join(KINDS)}")
        curves = {k: _curve(br[k], k, {"attn": geo.head_dim, "mlp": geo.mlp_hidden}[k], where) for k in KINDS}
        io = d["io_ms"]
        if not isinstance(io, dict) or set(KINDS) - set(io):
            raise LatencyTableError(f"{where}: 'io_ms' needs entries {', '.join(KINDS)}")
        table = cls(geometry=geo, batch=_pos_int(d["batch"], "batch", where),
                    threads=None if d.get("threads") is None else _pos_int(d["threads"], "threads", where),
                    provider=str(d["provider"]), curves=curves,
                    fixed_ms=_ms(d["fixed_ms"], "fixed_ms", where),
                    io_ms={k: _ms(io[k], f"io_ms.{k}", where) for k in KINDS},
                    dense_check=dict(d["dense_check"]) if isinstance(d["dense_check"], dict) else {},
                    device=dict(d.get("device") or {}), versions=dict(d.get("versions") or {}),
                    date=str(d.get("date", "")), overhead_ms=_ms(d.get("overhead_ms", 0.0), "overhead_ms", where),
                    repeats=_pos_int(d.get("repeats", 1), "repeats", where), settings=dict(d.get("settings") or {}),
                    tool_version=str(d.get("tool_version", "")),
                    target=str(d.get("target", _LEGACY_TARGET.get(str(d["provider"]), ""))),
                    correction=_correction(d.get("correction"), where))
        if table.target and table.target not in TARGETS:
            raise LatencyTableError(f"{where}: unknown target {table.target!r}")
        return table

    def validate(self) -> None:
        LatencyTable.from_dict(self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        try:
            d = read_json(path, "latency table")
        except LatencyTableError:
            raise
        except P3BError as e:
            raise LatencyTableError(str(e)) from None
        return cls.from_dict(d, where=f"latency table {path}")

    def save(self, path: str | os.PathLike) -> Path:
        """Validate, then write atomically (a bad table leaves nothing behind)."""
        self.validate()
        return write_json(path, self.to_dict())

    def summary(self) -> str:
        g, dc = self.geometry, self.dense_check
        lines = [f"latency table: {g.model} ({g.num_tokens} tokens), target {self.target or '-'} ({self.provider}), "
                 f"batch {self.batch}, threads {self.threads or 'default'}",
                 f"  fixed part {self.fixed_ms:.3f} ms, per-run overhead {self.overhead_ms:.3f} ms",
                 *(f"  {k}: " + ", ".join(f"{w}:{m:.3f}" for w, m in zip(c.widths, c.ms)) + " (width:ms per branch)"
                   for k, c in self.curves.items()),
                 f"  residual io cost per branch: attn {self.io_ms['attn']:.3f} ms, mlp {self.io_ms['mlp']:.3f} ms"]
        c = self.correction
        if c:
            lines.append(f"  correction ({c.get('model', 'scale+branch')}, chosen by held-out error) from "
                         f"{c.get('plans', 0)} whole plans + dense: x{self.scale:.3f} per branch cost "
                         f"+ {self.per_branch_ms:.4f} ms per live branch; median |error| on them "
                         f"{_pct(c.get('raw_median_abs_error'))} without, {_pct(c.get('median_abs_error'))} with")
        if dc.get("measured_ms"):
            lines.append(f"  dense check: predicted {dc['predicted_ms']:.3f} ms vs measured {dc['measured_ms']:.3f} ms "
                         f"({dc['error']:+.1%})")
        return "\n".join(lines)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def _correction(d: Any, where: str) -> dict[str, Any]:
    if d is None or d == {}:
        return {}
    if not isinstance(d, dict) or "scale" not in d or "per_branch_ms" not in d:
        raise LatencyTableError(f"{where}: 'correction' needs 'scale' and 'per_branch_ms'")
    _ms(d["scale"], "correction.scale", where)
    _ms(d["per_branch_ms"], "correction.per_branch_ms", where)
    return dict(d)


def _pos_int(v: Any, name: str, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LatencyTableError(f"{where}: {name} must be a positive integer, got {v!r}")
    return v


def _ms(v: Any, name: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise LatencyTableError(f"{where}: {name} must be a non-negative number of ms, got {v!r}")
    return float(v)


def _curve(d: Any, kind: str, full: int, where: str) -> Curve:
    if not isinstance(d, dict) or "widths" not in d or "ms" not in d:
        raise LatencyTableError(f"{where}: branches.{kind} needs 'widths' and 'ms'")
    w, ms = d["widths"], d["ms"]
    if not isinstance(w, list) or not isinstance(ms, list) or not w:
        raise LatencyTableError(f"{where}: branches.{kind} has an empty grid")
    if len(w) != len(ms):
        raise LatencyTableError(f"{where}: branches.{kind} has {len(w)} widths but {len(ms)} latencies")
    widths = [_pos_int(x, f"branches.{kind} width", where) for x in w]
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise LatencyTableError(f"{where}: branches.{kind} widths must be strictly ascending, got {widths}")
    if widths[-1] != full:
        raise LatencyTableError(f"{where}: branches.{kind} grid ends at {widths[-1]}, not the dense width {full}")
    vals = [_ms(x, f"branches.{kind} latency", where) for x in ms]
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise LatencyTableError(f"{where}: branches.{kind} latencies decrease with width ({vals}); "
                                "a table must be monotone")
    raw = d.get("raw_ms") or []
    return Curve(widths=widths, ms=vals, raw_ms=[float(x) for x in raw] if isinstance(raw, list) else [])


# --------------------------------------------------------------------------------------------
# Reading and measuring a probe pack
# --------------------------------------------------------------------------------------------
def read_manifest(pack: str | os.PathLike) -> dict[str, Any]:
    """The pack's manifest.json, checked: format, geometry, grid, and every listed file present."""
    pack = Path(pack)
    where = f"probe pack {pack}"
    if not (pack / "manifest.json").is_file():
        raise LatencyTableError(f"{where}: no manifest.json (make one with `p3b-deploy latency-pack MODEL --out DIR`)")
    try:
        m = read_json(pack / "manifest.json", "probe pack manifest")
    except P3BError as e:
        raise LatencyTableError(str(e)) from None
    if not isinstance(m, dict) or m.get("format") != PACK_FORMAT or m.get("version") != PACK_VERSION:
        raise LatencyTableError(f"{where}: manifest is not a {PACK_FORMAT} v{PACK_VERSION}")
    Geometry.from_dict(m.get("geometry"), where)
    files = m.get("files") or {}
    names = [files.get(k) for k in ("null", "fixed", "dense", "attn_io", "mlp_io")]
    for kind in KINDS:
        if not files.get(kind):
            raise LatencyTableError(f"{where}: empty grid for {kind}")
        names += list(files[kind].values())
    absent = [str(n) for n in names if not n or not (pack / n).is_file()]
    if absent:
        raise LatencyTableError(f"{where}: missing file(s) {', '.join(absent[:4])}")
    return m


#: what a pack's manifest records under "build" so its probe modules can be rebuilt (export.latency_pack)
BUILD_KEYS = ("model", "img_size", "patch_size", "num_classes", "repeats", "steps", "plans", "seed")


def manifest_build(manifest: dict[str, Any], where: str = "probe pack") -> dict[str, Any]:
    """The manifest's "build" record; a pack made before the record existed is refused in one line
    (its probes cannot be rebuilt for a target that runs no ONNX)."""
    b = manifest.get("build")
    if not isinstance(b, dict) or any(k not in b for k in BUILD_KEYS):
        raise LatencyTableError(f"{where} was made by p3b-deploy {manifest.get('tool_version', '?')}, whose manifest "
                                "cannot rebuild the probes for a target that runs no ONNX: remake the pack with this "
                                "version (p3b-deploy latency-pack)")
    return b


def pack_models(pack: str | os.PathLike) -> dict[str, str]:
    """label -> ONNX path of every probe of a (checked) pack, as `benchmark` takes them."""
    pack = Path(pack)
    files = read_manifest(pack)["files"]
    models = {"null": pack / files["null"], "fixed": pack / files["fixed"], "dense": pack / files["dense"]}
    for kind in KINDS:
        for w, f in files[kind].items():
            models[f"{kind}_{w}"] = pack / f
        models[f"{kind}_io"] = pack / files[f"{kind}_io"]
    for i, f in enumerate(files.get("plans") or []):
        models[f"plan_{i}"] = pack / f
    return {k: str(v) for k, v in models.items()}


def target_probes(pack: str | os.PathLike, target: Target, cache: str | os.PathLike | None = None) -> dict[str, str]:
    """The pack's probes as `target` runs them: fp32 targets time the files as they are; int8
    targets time copies quantized with the export's recipe (`onnx_quant`, static ones calibrated on
    seeded random inputs of the probe's shape: timing does not depend on the scales), written once
    into `cache` (default `<pack>/<variant>/`) and reused. The null graph stays fp32 (it has no
    linear layer: it prices the per-run cost only)."""
    models = pack_models(pack)
    if target.int8 is None:
        return models
    from ..onnx_quant import quantize_dynamic_int8, quantize_static_int8
    from ..io import atomic_path
    out = Path(cache) if cache is not None else Path(pack) / target.variant
    out.mkdir(parents=True, exist_ok=True)
    got = {"null": models["null"]}
    for label, src in models.items():
        if label == "null":
            continue
        dst = out / Path(src).name
        if not dst.is_file() or dst.stat().st_mtime < Path(src).stat().st_mtime:
            with atomic_path(dst) as tmp:
                if target.int8 == "dynamic":
                    quantize_dynamic_int8(src, tmp)
                else:
                    quantize_static_int8(src, tmp, random_inputs(src))
        got[label] = str(dst)
    return got


def random_inputs(path: str, n: int = 4, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Seeded standard-normal inputs of the file's input shape (batch axis = `batch`)."""
    import onnx
    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else batch for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    return [{inp.name: rng.standard_normal([batch, *dims[1:]]).astype(np.float32)} for _ in range(n)]


def measure_pack(pack: str | os.PathLike, batch: int = 1, threads: int | None = None, provider: str | None = None,
                 min_seconds: float = 1.0, min_iters: int = 10, warmup_seconds: float = 0.5,
                 target: str | Target | None = None) -> LatencyTable:
    """Time every probe of `pack` in one interleaved benchmark run; return the (validated) table.

    `target` (a `p3b_deploy.targets` name) times the probes as that target runs them (its runtime,
    precision and file variant) and is recorded in the table; `provider` (cpu, cuda, tensorrt:
    ONNX Runtime's execution providers; openvino) is the older way to name an fp32 runtime."""
    from .backends import create_backend
    from .runner import benchmark
    if target is not None and provider is not None:
        raise LatencyTableError("give a target or a provider, not both")
    if target is None and provider in (None, "cpu", "openvino"):
        target = {"openvino": "openvino-f32"}.get(provider or "cpu", "ort-fp32")
    if target is not None:
        t = get_target(target, threads=threads, batch=batch).check()
        backend, precision = t.backend, t.precision
        models = target_probes(pack, t) if t.runs_onnx else edge_probes(pack, t)
    else:
        backend = _PROVIDERS.get(provider, provider)
        if create_backend(backend).needs != "onnx":
            raise _runs_no_onnx(f"runtime {provider!r}", backend)
        t, precision, models = None, "fp32", pack_models(pack)
    rep = benchmark(models, backends=[backend], batches=[batch], threads=threads, precision=precision,
                    warmup_seconds=warmup_seconds, min_iters=min_iters, min_seconds=min_seconds)
    return table_from_report(pack, rep, batch, threads, target=t)


def edge_probes(pack: str | os.PathLike, target: Target) -> dict[str, str]:
    """The pack's probes lowered for an ExecuTorch / LiteRT target (`export.edge_probes`: rebuilt
    from the manifest with torch, cached under `<pack>/<variant>/`; reused without torch)."""
    read_manifest(pack)
    from ..export.edge_probes import lower_probes
    return lower_probes(pack, target, target.batch).files


def _runs_no_onnx(what: str, runtime: str) -> LatencyTableError:
    hint = (f" (name the deploy target instead: --target {'executorch' if runtime == 'executorch' else 'litert-fp32'}"
            ", whose table lowers the probes)" if runtime in ("executorch", "litert") else "")
    return LatencyTableError(f"latency tables time the pack's ONNX probes; {what} does not run ONNX files{hint}")


def table_from_report(pack: str | os.PathLike, rep: Any, batch: int, threads: int | None,
                      target: Target | None = None) -> LatencyTable:
    """The table from a BenchReport that timed the pack's probes (labels of `pack_models`; other
    models timed in the same run are ignored, so slim models can be interleaved with the probes)."""
    pack = Path(pack)
    m = read_manifest(pack)
    geo = Geometry.from_dict(m["geometry"])
    files = m["files"]
    rows = [r for r in rep.results if r["batch"] == batch]
    med = {r["model"]: float(r["median_ms"]) for r in rows}
    lost = [k for k in pack_models(pack) if k not in med]
    if lost:
        why = next((s["reason"] for s in rep.skipped), "not timed")
        raise LatencyTableError(f"could not time {', '.join(lost[:3])}: {why}")
    reps = int(m.get("repeats", 1))
    per = lambda key: max(med[key] - med["null"], 0.0) / reps  # noqa: E731
    curves = {}
    for kind in KINDS:
        widths = sorted(int(w) for w in files[kind])
        raw = [per(f"{kind}_{w}") for w in widths]
        curves[kind] = Curve(widths=widths, ms=isotonic(raw), raw_ms=raw)
    cfg = rep.config
    table = LatencyTable(geometry=geo, batch=int(batch), threads=threads,
                         provider=next((r["providers"][0] for r in rows if r.get("providers")), rows[0]["backend"]),
                         curves=curves, fixed_ms=med["fixed"], io_ms={k: 0.0 for k in KINDS},
                         dense_check={}, device={k: rep.system.get(k) for k in ("cpu", "cpu_count", "gpus", "platform")
                                                 if k in rep.system},
                         versions=dict(rep.system.get("versions") or {}),
                         date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         overhead_ms=med["null"], repeats=reps,
                         settings={k: cfg.get(k) for k in ("min_seconds", "min_iters", "warmup_seconds", "round_seconds")}
                         | {"pack_created": m.get("created"), "pack_tool_version": m.get("tool_version"),
                            "precision": cfg.get("precision")},
                         target="" if target is None else target.name)
    io_dims = m.get("io_dims") or {}
    half_in, half_out = int(io_dims.get("n_in", geo.embed_dim // 2)), int(io_dims.get("n_out", geo.embed_dim // 2))
    from ..spec import AttnDims, MlpDims
    probe_dims = {"attn": AttnDims(half_in, geo.num_heads, geo.head_dim, geo.head_dim, half_out),
                  "mlp": MlpDims(half_in, geo.mlp_hidden, half_out)}
    table.io_ms = {k: max(per(f"{k}_io") - table.branch_ms(k, probe_dims[k]), 0.0) for k in KINDS}
    table.correction = fit_correction(table, m.get("plans") or [], [med[f"plan_{i}"] for i in range(len(m.get("plans") or []))],
                                      med["dense"])
    table.dense_check = {"measured_ms": med["dense"], "predicted_ms": table.dense_ms,
                         "error": table.dense_ms / med["dense"] - 1.0}
    table.validate()
    return table


#: the correction's candidate models, simplest first: name -> free parameters (a, c)
CORRECTION_MODELS = ("sum", "scale", "scale+branch")


def fit_correction(table: LatencyTable, plans: Sequence[Sequence[Sequence[int]]], measured: Sequence[float],
                   dense_ms: float) -> dict[str, Any]:
    """The table's correction (a, c): fixed + a * (sum of branch costs) + c * (live branches),
    chosen among CORRECTION_MODELS ("sum": a = 1, c = 0; "scale": a >= 0, c = 0; "scale+branch":
    a, c >= 0, non-negative least squares) by leave-one-out relative error over the pack's whole
    plans and the dense model, then fitted on all of them; {} (no correction) without plans.

    A model is kept over a simpler one only when it predicts the point it did not see better on
    average: with 7 points a fit can bend to a few odd plans (it did on OpenVINO f32 at batch 1,
    where the plain sum was right), and the held-out error shows it."""
    if not plans:
        return {}
    g = table.geometry
    S, L, y = [], [], []
    for widths, ms in [*zip(plans, measured), ([(g.head_dim, g.mlp_hidden)] * g.depth, dense_ms)]:
        S.append(sum(float(table.curves["attn"](a)) + float(table.curves["mlp"](b)) for a, b in widths))
        L.append(sum((a > 0) + (b > 0) for a, b in widths))
        y.append(float(ms) - table.fixed_ms)
    X, Y = np.array([S, L], dtype=np.float64).T, np.array(y)
    meas = Y + table.fixed_ms
    rel = lambda ac, k=slice(None): (X[k] @ np.asarray(ac) + table.fixed_ms) / meas[k] - 1.0  # noqa: E731
    loo = {}
    for model in CORRECTION_MODELS:
        errs = [float(rel(_fit_model(model, X[keep], Y[keep], meas[keep]), i)) for i in range(len(Y))
                for keep in [np.arange(len(Y)) != i]]
        loo[model] = float(np.mean(np.abs(errs)))
    chosen = next(m for m in CORRECTION_MODELS if loo[m] <= min(loo.values()) + 1e-12)  # ties: the simplest
    a, c = _fit_model(chosen, X, Y, meas)
    raw, fit = rel((1.0, 0.0)), rel((a, c))
    return {"scale": float(a), "per_branch_ms": float(c), "model": chosen, "plans": len(plans),
            "loo_mean_abs_error": {m: round(v, 5) for m, v in loo.items()},
            "raw_median_abs_error": float(np.median(np.abs(raw))), "median_abs_error": float(np.median(np.abs(fit))),
            "points": [{"measured_ms": round(float(m), 5), "sum_ms": round(float(x), 5), "live": int(n),
                        "error": round(float(e), 4)} for m, x, n, e in zip(meas, X[:, 0], X[:, 1], fit)]}


def _fit_model(model: str, X: np.ndarray, Y: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    """(a, c) of one correction model, minimising squared relative error (every plan counts alike)."""
    if model == "sum":
        return 1.0, 0.0
    w = 1.0 / meas
    if model == "scale":
        col = X[:, 0] * w
        return (max(float(col @ (Y * w) / (col @ col)), 0.0) if col @ col > 0 else 1.0), 0.0
    return _nnls2(X * w[:, None], Y * w)


def _nnls2(X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Non-negative least squares with two columns (closed form over the active sets)."""
    best, best_err = (1.0, 0.0), math.inf
    cands = []
    sol, *_ = np.linalg.lstsq(X, y, rcond=None)
    cands.append(tuple(sol))
    for j in (0, 1):
        col = X[:, j]
        v = float(col @ y / (col @ col)) if col @ col > 0 else 0.0
        cands.append((v, 0.0) if j == 0 else (0.0, v))
    for a, c in cands:
        if a < 0 or c < 0:
            continue
        err = float(np.sum((X @ np.array([a, c]) - y) ** 2))
        if err < best_err:
            best, best_err = (float(a), float(c)), err
    return best
