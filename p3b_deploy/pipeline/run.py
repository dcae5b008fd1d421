"""`run`: the whole flow in one call — prune -> slim -> (recovery fine-tune) -> export -> bench.

One output folder, one sub-folder or file per stage:

    OUT/dense_run/  the dense baseline: the same fine-tuning without pruning (accuracy ceiling)
    OUT/run/        prune stage (dense weights + plan.json + metrics, keep_ratio.png)
    OUT/slim/       surgery (safetensors + config.json), verified against the masked model
    OUT/slim_ft/    optional recovery fine-tune of the slim model
    OUT/dense.onnx  the dense baseline model, for the latency ratios
    OUT/model.onnx  the slim model, verified against torch
    OUT/bench/      latency report (json/md/csv + latency.png)
    OUT/summary.{json,md}

Every finished stage leaves `OUT/.stages/<stage>.json` (its result record); a rerun on the same
folder skips those stages unless `force=True`. A failing stage raises `StageError` naming it;
earlier outputs stay in place.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import P3BError
from ..io import read_json, write_json, write_text

_log = logging.getLogger(__name__)

STAGES = ("dense", "latency", "prune", "slim", "finetune", "export", "evaluate", "bench")


class StageError(P3BError):
    """A pipeline stage failed; the message names the stage."""


def _prune_defaults() -> dict[str, Any]:
    # The built-in offline default: short schedule sized for a 2-core CPU (see README). A deployment
    # run keeps the residual dims whole (prune_residual False): on the accuracy benchmark that was
    # level at 50% and better at 70% and 85%, and the slim model needs no gather/scatter, so its
    # ORT latency follows its MACs (benchmarks/results/accuracy.md, latency_sparsity.md).
    return {"prune_ratio": 0.5, "epochs": 8.0, "start_frac": 0.25, "sparse_frac": 0.5, "final_frac": 0.75,
            "probe": "light", "prune_residual": False, "batch_size": 64, "lr": 5e-4, "warmup_epochs": 0.5,
            "update_every": 8, "eval_every": 2.0}


def _bench_defaults() -> dict[str, Any]:
    return {"backends": ["ort-cpu", "torch-cpu"], "batches": [1, 32], "threads": None,
            "warmup_seconds": 0.5, "min_iters": 10, "min_seconds": 1.5}


@dataclass
class RunConfig:
    """Everything `p3b-deploy run` does. File (YAML) first, CLI overrides; saved as OUT/run_config.json."""
    out: str = "runs/demo"  # output folder (stages inside, resumable)
    model: str = "vit_nano_patch4_16"  # timm model name
    checkpoint: str | None = "demo"  # source weights: local file, or "demo" = shipped MNIST-5k ViT-Nano
    pretrained: bool = False  # timm pretrained weights instead of checkpoint (needs timm's cache offline)
    num_classes: int | None = None  # classifier outputs (None: from the data)
    img_size: int | None = None  # input side override
    patch_size: int | None = None  # patch side override
    data: str = "digits"  # --data spec (built-in 'digits' = UCI digits, the offline target domain)
    data_root: str | None = None  # where torchvision datasets live
    download: bool = False  # allow torchvision downloads
    prune: dict[str, Any] = field(default_factory=_prune_defaults)  # P3BConfig fields
    round_to: int = 1  # round kept counts up to a multiple of this before surgery
    residual_io: str = "dense"  # residual reads/writes: index (exact size), dense (zero-padded), auto, ...
    # "dense" measured fastest for the small demo model (index ops dominate at D=64); deit-sized
    # models at ~50% residual kept run faster with "index" (benchmarks/results/residual_io.md).
    dense_baseline: bool = True  # also fine-tune without pruning (same schedule): the dense ceiling
    finetune_epochs: float = 0.0  # recovery fine-tuning of the slim model (0 = skip)
    distill: bool = True  # distil from the dense fine-tuned model during recovery fine-tuning
    export: dict[str, Any] = field(default_factory=dict)  # ExportConfig fields (int8, fp16, opset, ...)
    bench: dict[str, Any] = field(default_factory=_bench_defaults)  # benchmark() keyword arguments
    latency_target: str | None = None  # prune for this latency on this machine (e.g. "0.5" of dense, "12ms"):
    # a probe pack is timed here into OUT/latency_table.json and P3B budgets it (pipeline/latency.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        from ..configs import check_fields
        check_fields(cls, d, "run config")
        base = cls()
        merged = {}
        for k, v in d.items():
            default = getattr(base, k)
            merged[k] = {**default, **(v or {})} if isinstance(default, dict) else v
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_kwargs(self) -> dict[str, Any]:
        ckpt = self.checkpoint
        if ckpt == "demo":
            from ..models.demo import demo_checkpoint_path
            ckpt = str(demo_checkpoint_path())
        return dict(name=self.model, checkpoint=ckpt, pretrained=self.pretrained, num_classes=self.num_classes,
                    img_size=self.img_size, patch_size=self.patch_size)


@dataclass
class RunResult:
    out: Path  # the output folder
    summary: dict[str, Any]  # what summary.json holds
    skipped: list[str]  # stages reused from an earlier run


class _Stages:
    """Runs stages once; remembers each stage's record in OUT/.stages/<name>.json."""

    def __init__(self, out: Path, force: bool, on_stage: Callable[[str, str], None] | None) -> None:
        self.out, self.force, self.on_stage = out, force, on_stage
        self.dir = out / ".stages"
        self.skipped: list[str] = []

    def __call__(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        marker = self.dir / f"{name}.json"
        if _rank() != 0:
            return fn() if not marker.is_file() or self.force else read_json(marker, f"{name} stage record")
        if marker.is_file() and not self.force:
            self.skipped.append(name)
            self._say(name, "done earlier, skipped")
            return read_json(marker, f"{name} stage record")
        self._say(name, "running")
        t0 = time.time()
        try:
            rec = fn()
        except P3BError as e:
            raise StageError(f"stage '{name}' failed: {e}") from None
        except Exception as e:  # noqa: BLE001 — any failure must name the stage
            raise StageError(f"stage '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
                from e
        rec["seconds"] = round(time.time() - t0, 1)
        write_json(marker, rec)
        self._say(name, f"done in {rec['seconds']:.0f} s")
        return rec

    def _say(self, name: str, what: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name, what)


def run_pipeline(cfg: RunConfig, force: bool = False,
                 on_stage: Callable[[str, str], None] | None = None) -> RunResult:
    """Run (or resume) the pipeline into cfg.out and return its summary."""
    from ..pruning import P3BConfig
    out = Path(cfg.out)
    pcfg = P3BConfig.from_dict(dict(cfg.prune))  # validate before any work
    if force and (out / "run").exists():
        _clear(out)
    write_json(out / "run_config.json", cfg.to_dict())
    stages = _Stages(out, force, on_stage)
    rec: dict[str, dict[str, Any]] = {}
    if cfg.dense_baseline:
        rec["dense"] = stages("dense", lambda: _stage_prune(cfg, pcfg.replace(method="dense"), out, "dense_run"))
    if cfg.latency_target is not None:
        from .latency import stage_latency_table, with_latency_budget
        rec["latency"] = stages("latency", lambda: stage_latency_table(cfg, out))
        pcfg = with_latency_budget(pcfg, rec["latency"], cfg.latency_target)
    rec["prune"] = stages("prune", lambda: _stage_prune(cfg, pcfg, out))
    if _rank() != 0:  # under torchrun every rank trains; rank 0 alone does the rest
        return RunResult(out=out, summary={}, skipped=stages.skipped)
    rec["slim"] = stages("slim", lambda: _stage_slim(cfg, out))
    if cfg.finetune_epochs > 0:
        rec["finetune"] = stages("finetune", lambda: _stage_finetune(cfg, pcfg, out))
    rec["export"] = stages("export", lambda: _stage_export(cfg, out, _final_slim_dir(cfg, out)))
    rec["evaluate"] = stages("evaluate", lambda: _stage_evaluate(cfg, pcfg, out))
    rec["bench"] = stages("bench", lambda: _stage_bench(cfg, out))
    summary = _summarise(cfg, out, rec)
    if "latency" in rec:
        from .latency import latency_summary
        summary["latency_budget"] = latency_summary(rec["latency"], {"latency": rec["prune"].get("plan_meta_latency")},
                                                    rec["bench"]["results"])
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    return RunResult(out=out, summary=summary, skipped=stages.skipped)


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))


def _clear(out: Path) -> None:
    import shutil
    for name in ("dense_run", "run", "slim", "slim_ft", "bench", ".stages", "latency_pack"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    (out / "latency_table.json").unlink(missing_ok=True)
    for name in ("dense.onnx", "model.onnx", "summary.json", "summary.md"):
        for f in out.glob(name.replace(".onnx", "*.onnx")) if name.endswith(".onnx") else [out / name]:
            f.unlink(missing_ok=True)
        (out / name.replace(".onnx", ".export.json")).unlink(missing_ok=True)


def _final_slim_dir(cfg: RunConfig, out: Path) -> Path:
    return out / ("slim_ft" if cfg.finetune_epochs > 0 else "slim")


# ------------------------------------------------------------------------------------- stages
def _stage_prune(cfg: RunConfig, pcfg, out: Path, name: str = "run") -> dict[str, Any]:
    import shutil
    from ..data import build_loaders
    from ..pruning import prune
    from ..models.vit import load_model
    run_dir = out / name
    mkw = cfg.model_kwargs()
    if run_dir.exists() and (run_dir / "checkpoint.pt").exists() and not (run_dir / "plan.json").exists():
        pcfg = pcfg.replace(resume=str(run_dir))  # an interrupted prune: continue it
        _log.info("resuming the interrupted prune in %s", run_dir)
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    model = load_model(**mkw)
    data = build_loaders(cfg.data, model=model, batch_size=pcfg.batch_size, root=cfg.data_root,
                         download=cfg.download, seed=pcfg.seed)
    res = prune(model, data, pcfg, run_dir, model_kwargs=mkw)
    evals = [r for r in res.metrics if r.get("event") in ("eval", "final_hard_masks") and "top1" in r]
    return {"run_dir": str(run_dir), "params": res.plan.params, "macs": res.plan.macs,
            "keep_ratio": res.plan.keep_ratio, "masked_top1": evals[-1]["top1"] if evals else None,
            "method": pcfg.method, "prune_ratio": pcfg.prune_ratio, "plan_meta_latency": res.plan.meta.get("latency")}


def _stage_slim(cfg: RunConfig, out: Path) -> dict[str, Any]:
    from ..surgery.store import save_slim
    from ..surgery.core import slim_run_dir
    model = slim_run_dir(out / "run", round_to=cfg.round_to, residual_io=cfg.residual_io)
    save_slim(model, out / "slim")
    sc = model.p3b_slim_config
    return {"slim_dir": str(out / "slim"), "params": sum(p.numel() for p in model.parameters()),
            "macs": dict(sc.macs), "max_abs_diff_vs_masked": getattr(sc, "verified_max_abs_diff", None)}


def _stage_finetune(cfg: RunConfig, pcfg, out: Path) -> dict[str, Any]:
    from ..data import build_loaders
    from ..train import TrainConfig, finetune
    from ..surgery.store import load_slim, save_slim
    model = load_slim(out / "slim")
    teacher = None
    if cfg.distill:
        teacher = _dense_finetuned(cfg, out)
    data = build_loaders(cfg.data, model=model, batch_size=pcfg.batch_size, root=cfg.data_root,
                         download=cfg.download, seed=pcfg.seed)
    train_fields = {k: v for k, v in pcfg.to_dict().items() if k in TrainConfig.__dataclass_fields__}
    ft_cfg = TrainConfig.from_dict(dict(train_fields, epochs=cfg.finetune_epochs, warmup_epochs=0.0, resume=None))
    res = finetune(model, data, ft_cfg, out / "slim_ft", teacher=teacher, save=save_slim)
    evals = [r for r in res.metrics if r.get("event") == "eval" and "top1" in r]
    return {"slim_dir": str(out / "slim_ft"), "top1": evals[-1]["top1"] if evals else None}


def _dense_finetuned(cfg: RunConfig, out: Path):
    """The dense baseline: the dense fine-tune (dense_run/) or, without it, the prune run's
    fine-tuned weights with no masks."""
    from ..models.vit import load_model
    run = out / ("dense_run" if cfg.dense_baseline else "run")
    plan = json.loads((run / "plan.json").read_text())
    kw = dict(plan.get("meta", {}).get("model_kwargs") or {})
    return load_model(cfg.model, checkpoint=run / "model.safetensors",
                      num_classes=kw.get("num_classes", plan["num_classes"]), img_size=kw.get("img_size"),
                      patch_size=kw.get("patch_size"))


def _stage_export(cfg: RunConfig, out: Path, slim_dir: Path) -> dict[str, Any]:
    from ..export.exporter import export_onnx
    from ..surgery.store import load_slim
    slim_model = load_slim(slim_dir)
    dense = _dense_finetuned(cfg, out)
    size = _input_size(slim_model)
    plan = slim_model.p3b_slim_config.get_plan()
    meta = {"source_model": cfg.model, "prune_ratio": str(cfg.prune.get("prune_ratio")),
            "keep_ratio": json.dumps(plan.keep_ratio), "params_dense": str(plan.params["dense"]),
            "params": str(plan.params["kept"]), "macs_dense": str(plan.macs["dense"]), "macs": str(plan.macs["kept"])}
    slim_res = export_onnx(slim_model, out / "model.onnx", input_size=size, metadata=meta, **cfg.export)
    dense_meta = {"source_model": cfg.model, "prune_ratio": "0", "params": str(plan.params["dense"]),
                  "macs": str(plan.macs["dense"])}
    dense_res = export_onnx(dense, out / "dense.onnx", input_size=size, metadata=dense_meta,
                            opset=cfg.export.get("opset"))
    return {"model_onnx": str(out / "model.onnx"), "dense_onnx": str(out / "dense.onnx"),
            "parity": slim_res.to_dict().get("parity"), "dense_parity": dense_res.to_dict().get("parity"),
            "size_bytes": (out / "model.onnx").stat().st_size, "dense_size_bytes": (out / "dense.onnx").stat().st_size,
            "variants": slim_res.to_dict().get("variants")}


def _input_size(model) -> tuple[int, int, int]:
    pe = model.patch_embed
    return (pe.proj.in_channels, *[int(v) for v in pe.img_size])


def _stage_evaluate(cfg: RunConfig, pcfg, out: Path) -> dict[str, Any]:
    """Top-1 on the validation split: dense baseline (torch), slim (torch) and slim (ONNX Runtime)."""
    import numpy as np
    from ..data import build_loaders
    from ..onnx_io import load_onnx_session
    from ..surgery.store import load_slim
    slim_model = load_slim(_final_slim_dir(cfg, out)).eval()
    dense = _dense_finetuned(cfg, out).eval()
    data = build_loaders(cfg.data, model=slim_model, batch_size=64, root=cfg.data_root, download=cfg.download,
                         seed=pcfg.seed, augment=False)
    sess, _ = load_onnx_session(str(out / "model.onnx"))
    import torch
    hits = {"dense_torch": 0, "slim_torch": 0, "slim_onnx": 0}
    agree, n = 0, 0
    with torch.no_grad():
        for x, y in data.val:
            ps = slim_model(x).argmax(-1)
            hits["slim_torch"] += int((ps == y).sum())
            hits["dense_torch"] += int((dense(x).argmax(-1) == y).sum())
            po = sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0].argmax(-1)
            hits["slim_onnx"] += int((torch.from_numpy(po) == y).sum())
            agree += int((torch.from_numpy(po) == ps).sum())
            n += len(y)
    res = {k: round(100.0 * v / n, 2) for k, v in hits.items()}
    note = ("dense = the same fine-tuning without pruning" if cfg.dense_baseline else
            "dense = the prune run's fine-tuned weights without masks (no separate dense fine-tune)")
    res.update(val_images=n, onnx_torch_top1_agreement=round(100.0 * agree / n, 2), note=note)
    return res


def _stage_bench(cfg: RunConfig, out: Path) -> dict[str, Any]:
    from ..bench import benchmark
    from ..surgery.store import load_slim
    kw = dict(cfg.bench)
    dense = _dense_finetuned(cfg, out).eval()
    slim_model = load_slim(_final_slim_dir(cfg, out)).eval()
    report = benchmark({"dense": (dense, str(out / "dense.onnx")), "slim": (slim_model, str(out / "model.onnx"))},
                       **kw)
    bdir = out / "bench"
    report.save(bdir)
    rows = [{k: r.get(k) for k in ("model", "backend", "batch", "median_ms", "p90_ms", "throughput", "macs",
                                   "params", "speedup", "speedup_efficiency")} for r in report.results]
    return {"report_dir": str(bdir), "results": rows, "skipped": list(getattr(report, "skipped", []))}


# ------------------------------------------------------------------------------------- summary
def _summarise(cfg: RunConfig, out: Path, rec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    p, e = rec["prune"], rec["evaluate"]
    return {
        "out": str(out), "model": cfg.model, "data": cfg.data, "method": p.get("method"),
        "prune_ratio": p.get("prune_ratio"),
        "params": {"dense": p["params"]["dense"], "slim": rec["slim"]["params"], "plan_kept": p["params"]["kept"]},
        "residual_io": cfg.residual_io,
        "macs": {"dense": p["macs"]["dense"], "slim": p["macs"]["kept"]},
        "accuracy": {"dense_top1": e["dense_torch"], "masked_top1": p.get("masked_top1"),
                     "slim_top1": e["slim_torch"], "slim_onnx_top1": e["slim_onnx"],
                     "onnx_torch_top1_agreement": e["onnx_torch_top1_agreement"], "val_images": e["val_images"],
                     "note": e["note"]},
        "surgery_max_abs_diff": rec["slim"].get("max_abs_diff_vs_masked"),
        "onnx": {"parity": rec["export"].get("parity"), "size_bytes": rec["export"]["size_bytes"],
                 "dense_size_bytes": rec["export"]["dense_size_bytes"]},
        "latency": rec["bench"]["results"], "bench_skipped": rec["bench"]["skipped"],
        "keep_ratio": p.get("keep_ratio"),
        "files": {"keep_ratio_png": "run/keep_ratio.png", "latency_png": "bench/latency.png",
                  "plan": "run/plan.json", "slim_dir": Path(_final_slim_dir(cfg, out)).name,
                  "onnx": "model.onnx", "bench_report": "bench/report.md"},
        "stage_seconds": {k: v.get("seconds") for k, v in rec.items()},
    }


def summary_markdown(s: dict[str, Any]) -> str:
    a = s["accuracy"]
    pct = lambda k, d: f"{100 * k / d:.1f}%"  # noqa: E731
    lines = [
        f"# p3b-deploy run: {s['model']} on {s['data']}", "",
        f"Method **{s['method']}**, prune ratio {s['prune_ratio']}.", "",
        "| | dense | slim | slim / dense |", "|---|---:|---:|---:|",
        f"| parameters (built) | {s['params']['dense']:,} | {s['params']['slim']:,} | {pct(s['params']['slim'], s['params']['dense'])} |",
        f"| parameters (plan) | {s['params']['dense']:,} | {s['params']['plan_kept']:,} | {pct(s['params']['plan_kept'], s['params']['dense'])} |",
        f"| MACs / image | {s['macs']['dense']:,} | {s['macs']['slim']:,} | {pct(s['macs']['slim'], s['macs']['dense'])} |",
        f"| val top-1 (torch) | {a['dense_top1']:.2f}% | {a['slim_top1']:.2f}% | |",
        f"| ONNX size | {s['onnx']['dense_size_bytes'] / 1e6:.2f} MB | {s['onnx']['size_bytes'] / 1e6:.2f} MB | |", "",
        f"Slim ONNX top-1 {a['slim_onnx_top1']:.2f}% (agrees with torch on {a['onnx_torch_top1_agreement']:.1f}% "
        f"of {a['val_images']} val images). {a['note']}.", "",
        f"Surgery exactness (slim vs masked model, max abs logit diff): {s['surgery_max_abs_diff']}. "
        f"Residual reads/writes: `{s['residual_io']}` (\"dense\" zero-pads the branches that read or write "
        "fewer residual dims, so built parameters and MACs exceed the plan's, while MACs above are the plan's; \"index\" builds the "
        "exact plan size).", "",
        "## Latency (dense vs slim, interleaved in one run)", "",
        "| backend | batch | dense ms (median) | slim ms (median) | speedup | MAC reduction | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {}
    for r in s["latency"]:
        by.setdefault((r["backend"], r["batch"]), {})[r["model"]] = r
    for (backend, batch), d in by.items():
        if "dense" in d and "slim" in d:
            sl = d["slim"]
            mr = (d["dense"]["macs"] / sl["macs"]) if sl.get("macs") else float("nan")
            lines.append(f"| {backend} | {batch} | {d['dense']['median_ms']:.2f} | {sl['median_ms']:.2f} | "
                         f"{sl['speedup']:.2f}x | {mr:.2f}x | {sl['speedup_efficiency']:.2f} |")
    for sk in s["bench_skipped"]:
        lines.append(f"\nSkipped: {sk.get('backend')} ({sk.get('reason')})")
    if s.get("latency_budget"):
        from .latency import latency_markdown
        lines += [""] + latency_markdown(s["latency_budget"])
    lines += ["", "## Keep ratio per block over the mask updates", "", f"![keep ratios]({s['files']['keep_ratio_png']})",
              "", "## Latency vs MACs", "", f"![latency]({s['files']['latency_png']})", "",
              f"Stage times (s): {json.dumps(s['stage_seconds'])}", ""]
    return "\n".join(lines)


def summary_table(s: dict[str, Any]) -> str:
    """The final table printed on the terminal."""
    a = s["accuracy"]
    rows = [("params", f"{s['params']['dense']:,}", f"{s['params']['slim']:,}"),
            ("MACs/image", f"{s['macs']['dense']:,}", f"{s['macs']['slim']:,}"),
            ("val top-1", f"{a['dense_top1']:.2f}%", f"{a['slim_top1']:.2f}% (onnx {a['slim_onnx_top1']:.2f}%)")]
    by = {}
    for r in s["latency"]:
        by.setdefault((r["backend"], r["batch"]), {})[r["model"]] = r
    for (backend, batch), d in by.items():
        if "dense" in d and "slim" in d:
            rows.append((f"{backend} b{batch} ms", f"{d['dense']['median_ms']:.2f}",
                         f"{d['slim']['median_ms']:.2f} ({d['slim']['speedup']:.2f}x)"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "dense", "")])
    out = [f"{'':{w0}}  {'dense':>{w1}}  slim"]
    out += [f"{a:{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    return "\n".join(out)


def deep_update(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set `a.b=value` in a nested dict copy (for --set overrides)."""
    d = copy.deepcopy(base)
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise P3BError(f"--set {dotted}: {k} is not a section")
    cur[keys[-1]] = value
    return d
