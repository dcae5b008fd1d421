"""P3BConfig: every knob of a prune / fine-tune run, with the method page's defaults.

One typed dataclass, one comment per field. Config files (YAML/JSON) are read first, CLI flags
override them (`P3BConfig.from_dict` + `replace`), and the resolved config is saved as
config.json next to every run. Epoch-valued fields are floats (fractional epochs allowed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import P3BError

PROBES = ("reference", "light")
# Default learning rate of each probe kind's own param group (P3BConfig.probe_lr None). Reference:
# the method page's 5e-4. Light: 5e-3, chosen on benchmarks/results/probe_overhead.md: at 5e-4 the
# linear light probe is still far from trained when the first allocation is made, and its block
# ranking changed from seed to seed (rho 0.85); at 5e-3 it is stable (rho 0.97) and closer to the
# reference probe's ranking.
PROBE_LR = {"reference": 5e-4, "light": 5e-3}
BUDGETS = ("params", "macs")
GATE_FACTORS = {"attn_in": 1.0, "attn_qkv": 1.0, "attn_out": 1.5,
                "mlp_in": 1.0, "mlp_hid": 0.75, "mlp_out": 1.5}


def _gate_factors() -> dict[str, float]:
    return dict(GATE_FACTORS)


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """P3BError naming the keys of `d` that are not fields of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise P3BError(f"unknown {what} key(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")


@dataclass
class P3BConfig:
    # --- what to prune -------------------------------------------------------------------
    prune_ratio: float = 0.5          # fraction of the whole model's params (or MACs) removed, in (0, 1)
    method: str = "p3b"               # pruning method: "p3b", "uniform", "dense" (registry in baselines.py)
    budget: str = "params"            # what the budget counts: "params" or "macs"
    fixed_keep_ratio: Optional[Union[float, list[float]]] = None  # None: block benefit; float: uniform kr; list: 2*depth hand-set krs
    prune_residual: bool = True       # also prune the embed dims a branch reads/writes (attn/mlp in/out gates);
                                      # False: only head_dim and MLP hidden channels (no gather/scatter in the slim model)
    # --- inter-block allocation (method page section 4) ----------------------------------
    block_imp_scale: float = 10.0     # s: benefit scaled so its max equals s before the soft clip
    softplus_beta: float = 1.4        # slope of the softplus soft clip to (0, s)
    gamma: float = 0.2                # exponential smoothing weight of the new importance vs the previous one
    alpha: float = 0.5                # imp = alpha * v_cls + (1 - alpha) * v_patch
    # --- schedule (section 5), in epochs -------------------------------------------------
    start_epoch: float = 5.0          # end of warm-up: benefit/Taylor accumulation and first mask update
    sparse_epoch: float = 25.0        # end of sparsify: applied keep ratio reaches the goal
    final_epoch: float = 50.0         # end of sharpen: masks hard (tau 0) and frozen
    update_every: Optional[int] = None  # optimizer steps between mask updates; None -> ~3 per epoch
    tau_max: float = 0.1              # soft-mask temperature during sparsify
    tau_min: float = 0.0              # temperature at the end of sharpen (0 = hard step)
    # --- intra-block selection (section 6) -----------------------------------------------
    gate_factors: dict[str, float] = field(default_factory=_gate_factors)  # per-gate multiplier of the normalised Taylor ranks
    threshold_iters: int = 4          # fixed-point iterations of the bilinear threshold search
    # --- block-benefit probes (section 3) ------------------------------------------------
    probe: str = "reference"          # "reference" (cls Linear + 2x Conv3x3 patch probe) or "light" (cls Linear + LN/Linear on mean patch)
    probe_lr: Optional[float] = None  # learning rate of the probes' own param group; None: PROBE_LR[probe]
    # --- training -------------------------------------------------------------------------
    epochs: float = 50.0              # total training length in epochs (may exceed final_epoch)
    batch_size: int = 64              # per-process batch size (global = batch_size * world * grad_accum)
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-4                  # peak AdamW learning rate of the backbone
    min_lr: float = 1e-6              # cosine schedule floor
    weight_decay: float = 0.05        # AdamW decoupled weight decay (not on biases, norms, tokens, gates)
    warmup_epochs: float = 1.0        # linear lr warm-up before the cosine decay
    label_smoothing: float = 0.1      # cross-entropy label smoothing of the task loss
    clip_grad: Optional[float] = None  # max global grad norm; None disables clipping
    seed: int = 0                     # seed for init of probes, data order and augmentation
    amp: str = "auto"                 # "auto" (bf16 on CUDA if supported else fp16; fp32 on CPU), "bf16", "fp16", "off"
    device: str = "auto"              # "auto", "cpu", "cuda", "cuda:N" (under torchrun: cuda:LOCAL_RANK)
    eval_every: float = 1.0           # epochs between evaluations on the val split
    ckpt_every: Optional[int] = None  # optimizer steps between resumable checkpoints; None -> every eval
    max_steps: Optional[int] = None   # stop after this many optimizer steps (smoke tests); None = full run
    progress: bool = True             # tqdm bars with rate and ETA on rank 0
    resume: Optional[str] = None      # run dir to resume from (its checkpoint); None = fresh run
    # --- knowledge distillation (finetune stage) -----------------------------------------
    kd_alpha: float = 0.5             # weight of the soft-target KL term when a teacher is given
    kd_temperature: float = 2.0       # softmax temperature of the distillation targets

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise P3BError for values a user can get wrong; called on construction."""
        if self.method != "dense" and not 0.0 < float(self.prune_ratio) < 1.0:
            raise P3BError(f"prune ratio must be in (0, 1), got {self.prune_ratio}")
        if self.budget not in BUDGETS:
            raise P3BError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.probe not in PROBES:
            raise P3BError(f"probe must be one of {PROBES}, got {self.probe!r}")
        if self.probe_lr is not None and not float(self.probe_lr) > 0:
            raise P3BError(f"probe lr must be > 0, got {self.probe_lr}")
        if not 0.0 <= self.start_epoch <= self.sparse_epoch <= self.final_epoch:
            raise P3BError("schedule must satisfy 0 <= prune-start <= prune-sparse <= prune-final "
                           f"(got {self.start_epoch}, {self.sparse_epoch}, {self.final_epoch})")
        if self.epochs <= 0:
            raise P3BError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise P3BError("batch size and grad accumulation must be >= 1")
        if self.update_every is not None and self.update_every < 1:
            raise P3BError(f"update-every must be >= 1 step, got {self.update_every}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise P3BError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        unknown = set(self.gate_factors) - set(GATE_FACTORS)
        if unknown:
            raise P3BError(f"unknown gate factor(s) {sorted(unknown)}; known: {sorted(GATE_FACTORS)}")

    @property
    def probe_lr_value(self) -> float:
        """The probes' learning rate: probe_lr, or the default of the probe kind."""
        return float(self.probe_lr) if self.probe_lr is not None else PROBE_LR[self.probe]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "P3BConfig":
        """Build from a (file) dict; unknown keys are an error, not silently ignored."""
        check_fields(cls, d, "config")
        return cls(**d)

    def replace(self, **overrides: Any) -> "P3BConfig":
        """A copy with `overrides` applied (None values mean 'not given' and are skipped)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
