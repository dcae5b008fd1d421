"""Probe pack: the ONNX pieces a latency table is measured from (`p3b-deploy latency-pack`).

For one model geometry (timm name + input size) the pack holds, each with a dynamic batch axis:
  attn_<k>.onnx   `repeats` slim attention branches in a row (LN + qkv + attention + proj +
                  residual add), every one keeping k head_dim channels (q, k and v, all heads)
  mlp_<k>.onnx    `repeats` slim MLP branches (LN + fc1 + GELU + fc2 + add) keeping k hidden channels
  attn_io.onnx, mlp_io.onnx   the same at full width but reading/writing half the residual dims
                  through the slim model's index ops (prices residual-dim pruning)
  null.onnx       input -> output of the branch shape, no work: the per-run cost to subtract
  fixed.onnx      the never-pruned part (patch embed, tokens, pos embed, final norm, head)
  dense.onnx      the whole dense model (the table's sum check)
  plan_<i>.onnx   `plans` whole slim models of seeded plans (random, P3B-shaped, knapsack-like with
                  removed branches): timed in the same run as the probes, they fit the table's
                  correction for what a sum of branch costs misses (bench/latency_table.py)
  manifest.json   geometry, grid, files, repeats, plans, tool version, date, and `build`: what
                  `build_probes` needs to rebuild every probe module (same seeds) for the targets
                  that run no ONNX (ExecuTorch, LiteRT: `export.edge_probes` lowers them)
The branches are the very modules `slim` builds for those widths (`--no-prune-residual` plans),
exported with the exporter `export` uses, so the graph timed is the graph a slim model contains.
Several branches per file amortise the per-run overhead and keep weights from staying hot in
cache the way one repeated tiny branch would. Torch is needed here; measuring the pack is not.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .._version import __version__
from ..bench.latency_table import KINDS, PACK_FORMAT, PACK_VERSION, Geometry, manifest_build
from ..errors import ExportError
from ..io import atomic_dir, write_json
from ..plan import AttnPlan, LayerPlan, MlpPlan, Plan
from .config import DEFAULT_OPSET
from .onnx_file import _finish_graph, _torch_export, verify_onnx

GRID_STEPS = 8  # grid: width 1 and n*j/8 for j = 1..8 (9 points per branch kind)
CALIBRATION_PLANS = 6  # whole slim models per pack that fit the table's correction


@dataclass
class PackResult:
    """What `make_pack` wrote."""
    path: Path  # the pack folder
    geometry: Geometry  # the model geometry the pack is for
    files: dict  # manifest "files" entry
    seconds: float  # export time


def default_grid(n: int, steps: int = GRID_STEPS) -> list[int]:
    """Widths 1, n/steps, 2n/steps, ..., n (deduplicated, ascending)."""
    return sorted({1, *(max(1, round(n * j / steps)) for j in range(1, steps + 1))})


def _uniform_plan(spec, attn_k: int, mlp_k: int, io: int | None = None) -> Plan:
    """Every layer keeps attn_k head_dim channels and mlp_k hidden channels (+ io residual dims)."""
    return _width_plan(spec, [(attn_k, mlp_k)] * spec.depth, io)


def _width_plan(spec, widths: Sequence[tuple[int, int]], io: int | None = None) -> Plan:
    """Layer i keeps widths[i] = (head_dim channels, hidden channels); a width 0 removes the branch."""
    res = None if io is None else list(range(io))

    def keep(k: int, full: int) -> list[int] | None:
        return None if k == full else list(range(k))

    layers = [LayerPlan(attn=AttnPlan(removed=True) if a == 0 else
                        AttnPlan(qk=keep(a, spec.head_dim), v=keep(a, spec.head_dim), in_=res, out=res),
                        mlp=MlpPlan(removed=True) if m == 0 else MlpPlan(hidden=keep(m, spec.mlp_hidden), in_=res, out=res))
              for a, m in widths]
    return Plan(model=spec.name, img_size=spec.img_size[0], num_classes=spec.num_classes, dims=Plan.dense(spec).dims,
                layers=layers, meta={"purpose": "latency probe"})


def calibration_widths(spec, grids: dict[str, list[int]], n: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """`n` seeded per-layer (attn, mlp) width lists covering the plans a table must price: random
    widths, P3B-shaped (attention wide, MLP narrow), knapsack-like (removed branches, the rest at
    full or wide widths) and mixes of these."""
    import numpy as np
    rng = np.random.default_rng(seed)
    ga, gm = grids["attn"], grids["mlp"]

    def pick(grid: list[int], lo: float, hi: float, p_removed: float) -> int:
        if rng.random() < p_removed:
            return 0
        ok = [w for w in grid if lo * grid[-1] <= w <= hi * grid[-1]] or [grid[-1]]
        return int(rng.choice(ok))

    shapes = [  # (attn lo, attn hi, mlp lo, mlp hi, P(removed))
        (0.0, 1.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 1.0, 0.3), (0.75, 1.0, 0.1, 0.4, 0.0),
        (0.9, 1.0, 0.9, 1.0, 0.5), (0.4, 0.6, 0.4, 0.6, 0.0), (0.5, 1.0, 0.5, 1.0, 0.7)]
    out = []
    for i in range(n):
        alo, ahi, mlo, mhi, pr = shapes[i % len(shapes)]
        out.append([(pick(ga, alo, ahi, pr), pick(gm, mlo, mhi, pr)) for _ in range(spec.depth)])
    return out


class _Chain(nn.Module):
    """`repeats` slim branches applied in a row. `blocks` and `embed_dim` are what the edge
    lowerings look for (LiteRT's int8 path annotates the module types under `blocks`; its residual
    writes need the embed dim)."""

    def __init__(self, branches: Sequence[nn.Module], embed_dim: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.embed_dim = int(embed_dim)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.branches:
            x = b(x)
        return x


class _Null(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0


def _export(module: nn.Module, path: Path, example: torch.Tensor, threads: int | None) -> None:
    """Export like `export_onnx` does (dynamo, dynamic batch, stripped node metadata), verify vs torch."""
    module = module.eval()
    _, reason = _torch_export(module, path, example, DEFAULT_OPSET, dynamic=True)
    _finish_graph(path, {"tool": "p3b-deploy", "tool_version": __version__, "purpose": "latency probe"}, True)
    g = torch.Generator().manual_seed(0)
    cases = [("random", torch.randn(b, *example.shape[1:], generator=g)) for b in (1, 3)]
    verify_onnx(path, module, cases, tol=1e-3, threads=threads).raise_if_failed()
    if reason:
        raise ExportError(f"probe {path.name} fell back to the TorchScript exporter ({reason}); a slim model "
                          "exported with dynamo would differ, so the pack would not be exact")


@dataclass
class ProbeSet:
    """Every probe of a pack as torch modules (eval), before any file is written."""
    modules: dict[str, tuple[nn.Module, torch.Tensor]]  # label -> (module, example input of batch 2)
    spec: object  # the dense model's ViTSpec
    grids: dict[str, list[int]]  # kind -> widths
    plans: list[list[tuple[int, int]]]  # per calibration plan: per-layer (attn, mlp) widths
    build: dict  # the manifest's "build" record: what rebuilds these modules


def build_probes(model_name: str, img_size: int | None = None, repeats: int = 4, steps: int = GRID_STEPS,
                 num_classes: int | None = None, patch_size: int | None = None,
                 plans: int = CALIBRATION_PLANS) -> ProbeSet:
    """The probe modules of a pack, label -> (module, example input): attn_<k>, mlp_<k>, attn_io,
    mlp_io, null, fixed, dense, plan_<i>. Deterministic (torch seed 0, random weights: latency does
    not depend on them), so the edge targets rebuild the very graphs the pack's ONNX files hold
    (`probes_from_manifest`)."""
    import timm

    from ..models.vit import describe, load_model
    from ..surgery import slim
    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    if plans < 0:
        raise ExportError(f"plans must be >= 0, got {plans}")
    torch.manual_seed(0)
    dense = load_model(model_name, img_size=img_size, num_classes=num_classes, patch_size=patch_size)
    spec = describe(dense)
    probe = timm.create_model(model_name, img_size=spec.img_size[0], patch_size=spec.patch_size[0],
                              num_classes=spec.num_classes, depth=repeats).eval()
    if describe(probe).embed_dim != spec.embed_dim:
        raise ExportError(f"cannot build a {repeats}-layer probe of {model_name}")
    grids = {"attn": default_grid(spec.head_dim, steps), "mlp": default_grid(spec.mlp_hidden, steps)}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.num_tokens, spec.embed_dim, generator=gen)
    img = torch.randn(2, spec.in_chans, *spec.img_size, generator=gen)
    D = spec.embed_dim
    mods: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for j in range(max(len(grids["attn"]), len(grids["mlp"]))):  # one slim per grid point builds both kinds
        ka, km = grids["attn"][min(j, len(grids["attn"]) - 1)], grids["mlp"][min(j, len(grids["mlp"]) - 1)]
        sm = slim(probe, _uniform_plan(describe(probe), ka, km), verify=False)
        for kind, k in (("attn", ka), ("mlp", km)):
            mods.setdefault(f"{kind}_{k}", (_Chain([getattr(b, kind) for b in sm.blocks], D).eval(), x))
    sm = slim(probe, _uniform_plan(describe(probe), spec.head_dim, spec.mlp_hidden, D // 2), verify=False)
    for kind in KINDS:
        mods[f"{kind}_io"] = (_Chain([getattr(b, kind) for b in sm.blocks], D).eval(), x)
    mods["null"] = (_Null().eval(), x)
    mods["fixed"] = (_fixed_part(dense), img)
    mods["dense"] = (dense.eval(), img)
    cal = calibration_widths(spec, grids, plans)
    for i, widths in enumerate(cal):
        mods[f"plan_{i}"] = (slim(dense, _width_plan(spec, widths), verify=False).eval(), img)
    build = {"model": model_name, "img_size": int(spec.img_size[0]), "patch_size": int(spec.patch_size[0]),
             "num_classes": int(spec.num_classes), "repeats": int(repeats), "steps": int(steps), "plans": int(plans),
             "seed": 0}
    return ProbeSet(modules=mods, spec=spec, grids=grids, plans=cal, build=build)


def probes_from_manifest(manifest: dict, where: str = "probe pack") -> ProbeSet:
    """The pack's probe modules rebuilt from its manifest alone (its "build" record); a pack made
    before the record existed is refused in one line (`manifest_build`). Checks the rebuild against the manifest
    (grid and plans) so a changed default cannot pass for the pack's graphs."""
    b = manifest_build(manifest, where)
    ps = build_probes(b["model"], img_size=b["img_size"], repeats=b["repeats"], steps=b["steps"],
                      num_classes=b["num_classes"], patch_size=b["patch_size"], plans=b["plans"])
    if ps.grids != manifest.get("grid") or [[list(w) for w in p] for p in ps.plans] != manifest.get("plans", []):
        raise ExportError(f"{where}: rebuilding its probes gave another grid or other plans than its manifest; "
                          "remake the pack with this version (p3b-deploy latency-pack)")
    return ps


def make_pack(model_name: str, out: str | os.PathLike, img_size: int | None = None, repeats: int = 4,
              steps: int = GRID_STEPS, num_classes: int | None = None, threads: int | None = None,
              patch_size: int | None = None, plans: int = CALIBRATION_PLANS) -> PackResult:
    """Write the probe pack of `model_name` (random weights: latency does not depend on them)."""
    import time
    t0 = time.perf_counter()
    ps = build_probes(model_name, img_size=img_size, repeats=repeats, steps=steps, num_classes=num_classes,
                      patch_size=patch_size, plans=plans)
    spec, grids = ps.spec, ps.grids
    geo = Geometry.from_spec(spec)
    files: dict = {"attn": {}, "mlp": {}}
    with atomic_dir(out) as tmp:
        for label, (module, example) in ps.modules.items():
            _export(module, tmp / f"{label}.onnx", example, threads)
            kind, _, k = label.partition("_")
            if kind in KINDS and k != "io":
                files[kind][k] = f"{label}.onnx"
            elif not label.startswith("plan_"):
                files[label] = f"{label}.onnx"
        files["plans"] = [f"plan_{i}.onnx" for i in range(len(ps.plans))]
        io = spec.embed_dim // 2
        write_json(tmp / "manifest.json", {
            "format": PACK_FORMAT, "version": PACK_VERSION, "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "geometry": geo.to_dict(), "repeats": repeats, "grid": grids, "io_dims": {"n_in": io, "n_out": io},
            "files": files, "plans": [[list(w) for w in widths] for widths in ps.plans], "build": ps.build,
            "notes": "branches are slim-model modules exported with the dynamo exporter (opset "
                     f"{DEFAULT_OPSET}); random weights; 'build' rebuilds them (build_probes) for targets that "
                     "do not run ONNX"})
    return PackResult(path=Path(out), geometry=geo, files=files, seconds=round(time.perf_counter() - t0, 1))


def _fixed_part(model: nn.Module) -> nn.Module:
    """The dense model without its transformer layers: what no plan can shrink."""
    import copy
    m = copy.deepcopy(model)
    m.blocks = nn.Sequential()
    return m.eval()
