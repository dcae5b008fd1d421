"""The Plan: which channels every block keeps — the only contract between pruning and surgery.

A plan lists, per layer and branch, the kept residual dims a branch reads (`in`) and writes
(`out`), kept heads, kept head-dim channels for q/k and for v, and kept MLP hidden channels.
`None` means "all kept". It is written as plan.json (format "p3b-plan", version 1) and validated
on every read. Counts (params/MACs dense vs kept) are exact and derived from the ViTSpec.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import PlanError
from .io import read_json, write_json
from .spec import AttnDims, Counts, MlpDims, ViTSpec, count

FORMAT = "p3b-plan"
VERSION = 1

Idx = "list[int] | None"


@dataclass
class AttnPlan:
    removed: bool = False  # branch removed entirely (identity on the residual)
    in_: list[int] | None = None  # kept residual dims the branch reads (None = all)
    heads: list[int] | None = None  # kept heads (None = all)
    qk: list[int] | None = None  # kept head-dim channels of q and k, same for every head
    v: list[int] | None = None  # kept head-dim channels of v, same for every head
    out: list[int] | None = None  # kept residual dims the branch writes

    def to_dict(self) -> dict:
        return {"removed": self.removed, "in": self.in_, "heads": self.heads, "qk": self.qk,
                "v": self.v, "out": self.out}


@dataclass
class MlpPlan:
    removed: bool = False  # branch removed entirely
    in_: list[int] | None = None  # kept residual dims read by fc1
    hidden: list[int] | None = None  # kept hidden channels (fc1 out / fc2 in)
    out: list[int] | None = None  # kept residual dims written by fc2

    def to_dict(self) -> dict:
        return {"removed": self.removed, "in": self.in_, "hidden": self.hidden, "out": self.out}


@dataclass
class LayerPlan:
    attn: AttnPlan = field(default_factory=AttnPlan)  # attention branch
    mlp: MlpPlan = field(default_factory=MlpPlan)  # MLP branch


@dataclass
class Plan:
    model: str  # timm model name
    img_size: int  # input side the plan was made for
    num_classes: int  # classifier outputs
    dims: dict[str, int]  # embed_dim, depth, num_heads, head_dim, mlp_hidden of the dense model
    layers: list[LayerPlan]  # one per transformer layer
    keep_ratio: list[float] | None = None  # 2*depth per-block keep ratios (attn0, mlp0, ...)
    params: dict[str, int] | None = None  # {"dense", "kept"} parameter counts
    macs: dict[str, int] | None = None  # {"dense", "kept"} MACs per image
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (method, round_to, ...)

    # ---------------------------------------------------------------- construction
    @classmethod
    def dense(cls, spec: ViTSpec) -> "Plan":
        """A plan that keeps everything (the identity plan)."""
        return cls(model=spec.name, img_size=spec.img_size[0], num_classes=spec.num_classes,
                   dims=dims_of(spec), layers=[LayerPlan() for _ in range(spec.depth)])

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Parse and validate a plan dict (keep_ratio/params/macs optional)."""
        if not isinstance(d, dict):
            raise PlanError("plan must be a JSON object")
        if d.get("format") != FORMAT:
            raise PlanError(f"not a p3b plan: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") != VERSION:
            raise PlanError(f"unsupported plan version {d.get('version')!r} (this tool reads version {VERSION})")
        for k in ("model", "img_size", "num_classes", "dims", "layers"):
            if k not in d:
                raise PlanError(f"plan is missing '{k}'")
        try:
            layers = [LayerPlan(
                attn=AttnPlan(removed=bool(l["attn"].get("removed", False)), in_=l["attn"].get("in"),
                              heads=l["attn"].get("heads"), qk=l["attn"].get("qk"), v=l["attn"].get("v"),
                              out=l["attn"].get("out")),
                mlp=MlpPlan(removed=bool(l["mlp"].get("removed", False)), in_=l["mlp"].get("in"),
                            hidden=l["mlp"].get("hidden"), out=l["mlp"].get("out")),
            ) for l in d["layers"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"malformed plan layers: {e!r}") from None
        plan = cls(model=str(d["model"]), img_size=int(d["img_size"]), num_classes=int(d["num_classes"]),
                   dims={k: int(v) for k, v in d["dims"].items()}, layers=layers,
                   keep_ratio=d.get("keep_ratio"), params=d.get("params"), macs=d.get("macs"),
                   meta=dict(d.get("meta") or {}))
        plan.validate()
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(read_json(path, "plan"))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model, "img_size": self.img_size,
            "num_classes": self.num_classes, "dims": dict(self.dims),
            "layers": [{"attn": l.attn.to_dict(), "mlp": l.mlp.to_dict()} for l in self.layers],
            "keep_ratio": self.keep_ratio, "params": self.params, "macs": self.macs, "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        self.validate()
        return write_json(path, self.to_dict())

    # ---------------------------------------------------------------- validation
    def validate(self, spec: ViTSpec | None = None) -> None:
        """Check index ranges, order, uniqueness, non-empty live branches; against `spec` if given."""
        need = ("embed_dim", "depth", "num_heads", "head_dim", "mlp_hidden")
        miss = [k for k in need if k not in self.dims]
        if miss:
            raise PlanError(f"plan dims miss {miss}")
        D, H, hd, hid = (self.dims[k] for k in ("embed_dim", "num_heads", "head_dim", "mlp_hidden"))
        if len(self.layers) != self.dims["depth"]:
            raise PlanError(f"plan has {len(self.layers)} layers but dims.depth is {self.dims['depth']}")
        if spec is not None:
            theirs = dims_of(spec)
            if theirs != {k: self.dims[k] for k in need}:
                raise PlanError(f"plan was made for dims {self.dims}, model {spec.name} has {theirs}")
        for i, l in enumerate(self.layers):
            if not l.attn.removed:
                for key, n in (("in", D), ("heads", H), ("qk", hd), ("v", hd), ("out", D)):
                    _check_idx(getattr(l.attn, "in_" if key == "in" else key), n, f"layer {i} attn.{key}")
            if not l.mlp.removed:
                for key, n in (("in", D), ("hidden", hid), ("out", D)):
                    _check_idx(getattr(l.mlp, "in_" if key == "in" else key), n, f"layer {i} mlp.{key}")
        if self.keep_ratio is not None:
            if len(self.keep_ratio) != 2 * len(self.layers):
                raise PlanError(f"keep_ratio has {len(self.keep_ratio)} values, expected {2 * len(self.layers)}")
            if any(not (0.0 <= float(r) <= 1.0) for r in self.keep_ratio):
                raise PlanError("keep_ratio values must lie in [0, 1]")
        for name, c in (("params", self.params), ("macs", self.macs)):
            if c is not None and (not isinstance(c, dict) or not {"dense", "kept"} <= set(c)):
                raise PlanError(f"plan {name} must be {{'dense': int, 'kept': int}}")

    # ---------------------------------------------------------------- kept sizes and counts
    def attn_dims(self, i: int) -> AttnDims | None:
        a = self.layers[i].attn
        if a.removed:
            return None
        D, H, hd = self.dims["embed_dim"], self.dims["num_heads"], self.dims["head_dim"]
        return AttnDims(_n(a.in_, D), _n(a.heads, H), _n(a.qk, hd), _n(a.v, hd), _n(a.out, D))

    def mlp_dims(self, i: int) -> MlpDims | None:
        m = self.layers[i].mlp
        if m.removed:
            return None
        D = self.dims["embed_dim"]
        return MlpDims(_n(m.in_, D), _n(m.hidden, self.dims["mlp_hidden"]), _n(m.out, D))

    @property
    def removed_branches(self) -> int:
        """How many attention and MLP branches the plan removes entirely (identity in the slim model)."""
        return sum(L.attn.removed + L.mlp.removed for L in self.layers)

    def kept_dims(self) -> list[tuple[AttnDims | None, MlpDims | None]]:
        return [(self.attn_dims(i), self.mlp_dims(i)) for i in range(len(self.layers))]

    def counts(self, spec: ViTSpec, params_other: int) -> Counts:
        """Exact counts of the model surgery builds from this plan."""
        self.validate(spec)
        return count(spec, params_other, self.kept_dims())

    def with_counts(self, spec: ViTSpec, params_other: int) -> "Plan":
        """A copy with params/macs (dense vs kept) and realised keep ratios filled in."""
        dense = count(spec, params_other)
        kept = self.counts(spec, params_other)
        kr = [k / d if d else 1.0 for k, d in zip(kept.params_blocks, dense.params_blocks)]
        return replace(self, params={"dense": dense.params, "kept": kept.params},
                       macs={"dense": dense.macs, "kept": kept.macs},
                       keep_ratio=self.keep_ratio if self.keep_ratio is not None else kr)

    def model_kwargs(self) -> dict[str, Any]:
        """load_model kwargs that rebuild the plan's dense model: plan fields, then meta.model_kwargs."""
        kw: dict[str, Any] = {"img_size": self.img_size, "num_classes": self.num_classes}
        extra = self.meta.get("model_kwargs") or {}
        if not isinstance(extra, dict):
            raise PlanError("plan meta.model_kwargs must be an object")
        kw.update({k: v for k, v in extra.items() if k in ("num_classes", "img_size", "patch_size")})
        return kw

    def realised_keep_ratio(self, spec: ViTSpec, params_other: int) -> list[float]:
        dense = count(spec, params_other)
        kept = self.counts(spec, params_other)
        return [k / d if d else 1.0 for k, d in zip(kept.params_blocks, dense.params_blocks)]


def dims_of(spec: ViTSpec) -> dict[str, int]:
    return {"embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
            "head_dim": spec.head_dim, "mlp_hidden": spec.mlp_hidden}


def _n(idx: Sequence[int] | None, full: int) -> int:
    return full if idx is None else len(idx)


def _check_idx(idx, n: int, where: str) -> None:
    if idx is None:
        return
    if not isinstance(idx, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in idx):
        raise PlanError(f"{where} must be a list of integers or null")
    if not idx:
        raise PlanError(f"{where} is empty in a live branch (mark the branch removed instead)")
    if idx[0] < 0 or idx[-1] >= n:
        raise PlanError(f"{where} has indices outside [0, {n})")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise PlanError(f"{where} must be sorted and unique")
    if not all(0 <= j < n for j in idx):
        raise PlanError(f"{where} has indices outside [0, {n})")
