"""RunConfig: everything `p3b-deploy run` does, with the built-in offline default (no torch)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from ..configs import ConfigBase, check_fields, opt
from ..errors import P3BError
from ..spec import RESIDUAL_IO_CHOICES


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
class RunConfig(ConfigBase):
    """Everything `p3b-deploy run` does. File (YAML) first, CLI overrides; saved as OUT/run_config.json."""
    out: str = opt("runs/demo", "output folder (stages inside; rerunning resumes it)")
    model: str = opt("vit_nano_patch4_16", "timm model name")
    checkpoint: Optional[str] = opt("demo", "source weights file, or 'demo' (the shipped MNIST-5k ViT-Nano)")
    pretrained: bool = opt(False, "timm pretrained weights instead of --checkpoint (needs timm's cache offline)")
    num_classes: Optional[int] = opt(None, "classifier outputs (default: from the data)")
    img_size: Optional[int] = opt(None, "input side override")
    patch_size: Optional[int] = opt(None, "patch side override")
    data: str = opt("digits", "data spec (built-in digits = UCI digits, the offline target domain)")
    data_root: Optional[str] = opt(None, "where torchvision datasets live on disk")
    download: bool = opt(False, "allow torchvision downloads")
    prune: dict[str, Any] = opt(factory=_prune_defaults, help="P3BConfig fields of the prune stage", cli=False)
    round_to: int = opt(1, "round kept counts up to a multiple of this before surgery")
    # "dense" measured fastest for the small demo model (index ops dominate at D=64); deit-sized
    # models at ~50% residual kept run faster with "index" (benchmarks/results/residual_io.md).
    residual_io: str = opt("dense", "how slim branches read/write kept residual dims", choices=RESIDUAL_IO_CHOICES)
    dense_baseline: bool = opt(True, "also fine-tune without pruning (same schedule): the dense ceiling")
    finetune_epochs: float = opt(0.0, "recovery fine-tuning epochs of the slim model (0 = skip)")
    distill: bool = opt(True, "distil from the dense fine-tuned model during recovery fine-tuning")
    export: dict[str, Any] = opt(factory=dict, help="ExportConfig fields (int8, fp16, opset, ...)", cli=False)
    bench: dict[str, Any] = opt(factory=_bench_defaults, help="benchmark() keyword arguments", cli=False)
    serve: bool = opt(False, "also serve dense + slim with a local Triton server (bash scripts/setup.sh --serve): "
                             "parity through the server and served throughput in summary.md")
    targets: list[str] = opt(factory=list, help="also build the deployment matrix of dense and slim on these targets "
                             "(OUT/deploy/matrix.md), e.g. ort-fp32,ort-int8,openvino-f32,openvino-int8,executorch; "
                             "names: p3b_deploy.targets.TARGETS (default: none)")
    target: Optional[str] = opt(None, "the deployment target the model ships on (p3b_deploy.targets, e.g. ort-int8, "
                                      "openvino-int8): with --latency-target the plan is priced on its table, its "
                                      "file is exported and gated, dense and slim are timed on it, and summary.md "
                                      "says whether the promise was kept (default: ort-fp32)")
    latency_target: Optional[str] = opt(None, "prune for this latency on this machine: a fraction of the dense "
                                              "latency (e.g. 0.5) or ms (e.g. 12ms); a probe pack is timed here first "
                                              "(OUT/latency_table.json, on --target at the bench's threads and first "
                                              "batch)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        check_fields(cls, d, "run config")
        base = cls()
        merged = {}
        for k, v in d.items():
            default = getattr(base, k)
            merged[k] = {**default, **(v or {})} if isinstance(default, dict) else v
        return cls(**merged)

    def model_kwargs(self) -> dict[str, Any]:
        ckpt = self.checkpoint
        if ckpt == "demo":
            from ..models.demo import demo_checkpoint_path
            ckpt = str(demo_checkpoint_path())
        return dict(name=self.model, checkpoint=ckpt, pretrained=self.pretrained, num_classes=self.num_classes,
                    img_size=self.img_size, patch_size=self.patch_size)


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
