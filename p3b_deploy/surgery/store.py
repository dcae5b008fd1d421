"""Save and load slim models without pickle: `model.safetensors` + `config.json` in one folder.

config.json carries everything needed to rebuild the module with timm alone plus our slim
blocks: timm name and create kwargs, the realised plan (every kept index), per-block reduced
dims, gather/scatter indices, removed branches, original attention scales, residual-io mode,
preprocessing (input size, mean, std, interpolation, crop) and class count. `load_slim` creates
the dense skeleton with timm (random init, no download), re-applies the recorded structure and
loads the weights, checking every name, shape and index against the config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._version import __version__
from ..errors import CheckpointError, P3BError, PlanError, SurgeryError
from ..io import atomic_dir, read_json
from ..models.vit import PREPROC_KEYS, preprocessing_of
from ..plan import Plan

FORMAT = "p3b-slim"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def _config_of(model: nn.Module):
    from .core import SlimConfig
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    cfg = getattr(model, "p3b_slim_config", None)
    if not isinstance(cfg, SlimConfig):
        raise SurgeryError("not a slim model (no p3b_slim_config): build it with p3b_deploy.slim(model, plan)")
    return model, cfg


def _block_records(cfg) -> list[dict[str, Any]]:
    plan = cfg.get_plan()
    rows = []
    for i, L in enumerate(plan.layers):
        a, m = L.attn, L.mlp
        ad, md = plan.attn_dims(i), plan.mlp_dims(i)
        rows.append({"block": f"attn{i}", "removed": a.removed, "residual_io": cfg.residual_io[2 * i],
                     "scale": cfg.scales[i],
                     **({} if ad is None else {"in": ad.n_in, "heads": ad.heads, "qk": ad.qk, "v": ad.v,
                                               "out": ad.n_out, "in_idx": a.in_, "out_idx": a.out,
                                               "heads_idx": a.heads, "qk_idx": a.qk, "v_idx": a.v})})
        rows.append({"block": f"mlp{i}", "removed": m.removed, "residual_io": cfg.residual_io[2 * i + 1],
                     **({} if md is None else {"in": md.n_in, "hidden": md.hidden, "out": md.n_out,
                                               "in_idx": m.in_, "out_idx": m.out, "hidden_idx": m.hidden})})
    return rows


def save_slim(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write `model.safetensors` + `config.json` to out_dir atomically; returns out_dir."""
    from safetensors.torch import save_file
    model, cfg = _config_of(model)
    if cfg.model_kwargs is None:
        raise SurgeryError(f"cannot save: no timm.create_model('{cfg.model}', ...) arguments rebuild this "
                           "model's architecture")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT, "version": VERSION, "tool_version": __version__,
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "num_classes": int(model.num_classes),
        "preprocessing": preprocessing_of(model),
        "residual_io": cfg.residual_io, "scales": cfg.scales, "round_to": cfg.round_to,
        "params": cfg.params, "macs": cfg.macs, "verified_max_abs_diff": cfg.verified_max_abs_diff,
        "blocks": _block_records(cfg), "plan": cfg.plan,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "p3b": FORMAT})
        (tmp / CONFIG).write_text(_dumps(config))
    return out_dir


def _dumps(config: dict[str, Any]) -> str:
    """JSON with one line per top-level key and per block / plan layer (index lists stay inline)."""
    def val(k: str, v: Any) -> str:
        if k == "blocks":
            return "[\n" + ",\n".join(f"    {json.dumps(r)}" for r in v) + "\n  ]"
        if k == "plan":
            head = {kk: vv for kk, vv in v.items() if kk != "layers"}
            layers = ",\n".join(f"      {json.dumps(L)}" for L in v["layers"])
            return json.dumps(head)[:-1] + ', "layers": [\n' + layers + "\n  ]}"
        return json.dumps(v)
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {val(k, v)}" for k, v in config.items()) + "\n}\n"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def read_slim_config(slim_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check config.json of a slim dir (format, version, required keys)."""
    slim_dir = Path(slim_dir)
    if not slim_dir.is_dir():
        raise CheckpointError(f"slim dir not found: {slim_dir}")
    try:
        cfg = read_json(slim_dir / CONFIG, "slim config")
    except P3BError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{slim_dir / CONFIG} is not a p3b slim config (format {got!r}, expected {FORMAT!r})")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"unsupported slim config version {cfg.get('version')!r} (this tool reads {VERSION})")
    for k in ("model", "model_kwargs", "plan", "residual_io"):
        if k not in cfg:
            raise CheckpointError(f"{slim_dir / CONFIG} is missing '{k}'")
    return cfg


def plan_of_config(cfg: dict, where: Path) -> Plan:
    try:
        plan = Plan.from_dict(cfg["plan"])
    except PlanError as e:
        raise CheckpointError(f"{where}: bad plan: {e}") from None
    blocks = cfg.get("blocks")
    if blocks is not None:  # the descriptive per-block section must agree with the plan
        for row in blocks:
            if not isinstance(row, dict):
                raise CheckpointError(f"{where}: malformed 'blocks' entry")
            kind, i = ("attn", row["block"][4:]) if str(row.get("block", "")).startswith("attn") \
                else ("mlp", str(row.get("block", ""))[3:])
            if not i.isdigit() or int(i) >= len(plan.layers):
                raise CheckpointError(f"{where}: unknown block {row.get('block')!r}")
            bp = getattr(plan.layers[int(i)], kind)
            if bool(row.get("removed")) != bp.removed or (not bp.removed and (
                    row.get("in_idx") != bp.in_ or row.get("out_idx") != bp.out)):
                raise CheckpointError(f"{where}: block {row['block']} disagrees with the plan (indices/removed)")
    return plan


def _skeleton(cfg: dict, where: Path) -> nn.Module:
    import timm
    from ..models.vit import _check_name
    name, kw = cfg["model"], cfg["model_kwargs"]
    if not isinstance(kw, dict):
        raise CheckpointError(f"{where}: model_kwargs must be an object")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    _check_name(name)
    try:
        return timm.create_model(name, pretrained=False, **kw).eval()
    except Exception as e:  # noqa: BLE001 — timm raises many types for bad kwargs
        raise CheckpointError(f"{where}: cannot create {name} with {kw}: {str(e).splitlines()[0][:160]}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"slim weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {str(e).splitlines()[0][:160]}") from None


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where} does not match config.json: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where} does not match config.json: {k} has shape {tuple(v.shape)}, "
                                  f"config implies {tuple(own[k].shape)}")
        if k.endswith(("in_idx", "out_idx")) and not torch.equal(v.to(own[k].dtype), own[k]):
            raise CheckpointError(f"{where} does not match config.json: indices {k} differ")


def load_slim(slim_dir: str | os.PathLike) -> nn.Module:
    """Rebuild a slim model saved by `save_slim` (timm skeleton + recorded structure + weights).
    Needs torch, timm and this package only (no Torch-Pruning: nothing is cut, weights are loaded)."""
    from .core import slim
    slim_dir = Path(slim_dir)
    cfg = read_slim_config(slim_dir)
    where = slim_dir / CONFIG
    plan = plan_of_config(cfg, where)
    ios = cfg["residual_io"]
    if not isinstance(ios, list) or len(ios) != 2 * len(plan.layers):
        raise CheckpointError(f"{where}: residual_io must list {2 * len(plan.layers)} blocks")
    ios = ["index" if io == "removed" else io for io in ios]
    state = _read_weights(slim_dir / WEIGHTS)
    dense = _skeleton(cfg, where)
    try:
        model = slim(dense, plan, residual_io=ios, verify=False, structure_only=True)
    except P3BError as e:
        raise CheckpointError(f"{where} does not fit {cfg['model']}: {e}") from None
    _check_state(model, state, slim_dir / WEIGHTS)
    model.load_state_dict(state, strict=True)
    c = model.p3b_slim_config
    c.round_to = int(cfg.get("round_to", c.round_to))
    c.verified_max_abs_diff = cfg.get("verified_max_abs_diff")
    if cfg.get("scales") is not None and [float(s) for s in cfg["scales"]] != c.scales:
        raise CheckpointError(f"{where}: attention scales {cfg['scales'][:2]}... disagree with {cfg['model']}")
    _apply_preprocessing(model, cfg.get("preprocessing") or {})
    return model.eval()


def _apply_preprocessing(model: nn.Module, pre: dict[str, Any]) -> None:
    """Carry the saved preprocessing into timm's pretrained_cfg (so resolve_data_config sees it)."""
    pc = dict(getattr(model, "pretrained_cfg", None) or {})
    for k in PREPROC_KEYS + ("input_size",):
        if pre.get(k) is not None:
            pc[k] = tuple(pre[k]) if isinstance(pre[k], list) else pre[k]
    pc["num_classes"] = int(model.num_classes)
    model.pretrained_cfg = pc


# --------------------------------------------------------------------------------------------
# Any plan source: plan.json, run dir, slim dir (for `inspect`)
# --------------------------------------------------------------------------------------------
def read_plan_source(path: str | os.PathLike) -> tuple[Plan, str, dict[str, Any]]:
    """(plan, kind, model_kwargs) from a plan.json file, a run dir or a slim dir."""
    from ..artifacts import resolve
    art = resolve(path, ("plan", "run", "slim"), "PLAN_OR_RUN_DIR_OR_SLIM_DIR")
    if art.kind == "slim":
        cfg = read_slim_config(art.path)
        return plan_of_config(cfg, art.path / CONFIG), "slim dir", dict(cfg["model_kwargs"])
    plan = art.plan()
    return plan, ("run dir" if art.kind == "run" else "plan"), plan.model_kwargs()


def inspect_source(path: str | os.PathLike) -> dict[str, Any]:
    """Per-block table of a plan / run dir / slim dir: {"kind", "plan", "rows", "params", "macs"}.

    Exact keep ratios need the model's structure: it is built by timm on the meta device (no
    memory, no weights); if that fails the plan's own keep_ratio is shown instead."""
    import timm
    from .core import block_rows
    from ..models.vit import describe, nonblock_params
    from ..spec import count
    plan, kind, kw = read_plan_source(path)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    spec, other = None, 0
    try:
        with torch.device("meta"):
            skel = timm.create_model(plan.model, pretrained=False, **kw)
        spec, other = describe(skel), nonblock_params(skel)
        plan.validate(spec)
    except Exception:  # noqa: BLE001 — fall back to the plan's own numbers
        spec = None
    out: dict[str, Any] = {"kind": kind, "plan": plan, "rows": block_rows(plan, spec, other),
                           "params": plan.params, "macs": plan.macs}
    if spec is not None:
        dense, kept = count(spec, other), plan.counts(spec, other)
        out["params"] = {"dense": dense.params, "kept": kept.params}
        out["macs"] = {"dense": dense.macs, "kept": kept.macs}
    return out
