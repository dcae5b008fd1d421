"""TrainConfig: the fine-tuning loop's settings (shared by prune, finetune and the dense baseline).

Defaults are what the benchmarks measured to work on the shipped transfer task
(benchmarks/results/accuracy.md: AdamW 5e-4, cosine, 1 warm-up epoch); pruning methods add their
own fields on top (`p3b_deploy.pruning.P3BConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..configs import ConfigBase, opt
from ..errors import P3BError

AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainConfig(ConfigBase):
    epochs: float = opt(50.0, "training epochs (fractions allowed)")
    batch_size: int = opt(64, "images per process per micro-batch (global = batch x world x grad-accum)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak AdamW learning rate of the backbone (cosine schedule)")
    min_lr: float = opt(1e-6, "cosine schedule floor")
    weight_decay: float = opt(0.05, "AdamW decoupled weight decay (not on biases, norms, tokens, gates)")
    warmup_epochs: float = opt(1.0, "linear learning-rate warm-up before the cosine decay")
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing of the task loss")
    clip_grad: Optional[float] = opt(None, "max global grad norm (default: no clipping)")
    seed: int = opt(0, "seed for init of probes, data order and augmentation")
    amp: str = opt("auto", "mixed precision: auto = bf16/fp16 on CUDA, fp32 on CPU; bf16 also runs on CPU",
                   choices=AMP_MODES)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    eval_every: float = opt(1.0, "epochs between evaluations on the val split")
    ckpt_every: Optional[int] = opt(None, "optimizer steps between resumable checkpoints (default: every eval)")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (smoke tests)")
    progress: bool = opt(True, "progress bars (plain log lines when stdout is not a terminal)", cli=False)
    resume: Optional[str] = opt(None, "run dir to resume from (its checkpoint)", cli=False)
    kd_alpha: float = opt(0.5, "weight of the distillation KL term when a teacher is given")
    kd_temperature: float = opt(2.0, "distillation softmax temperature")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise P3BError for values a user can get wrong; called on construction."""
        if self.epochs <= 0:
            raise P3BError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise P3BError("batch size and grad accumulation must be >= 1")
        if not self.lr > 0:
            raise P3BError(f"lr must be > 0, got {self.lr}")
        if self.amp not in AMP_MODES:
            raise P3BError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise P3BError(f"kd alpha must be in [0, 1], got {self.kd_alpha}")
