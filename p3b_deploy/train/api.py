"""Recovery fine-tuning without pruning: `finetune(model, data, cfg, out_dir) -> FinetuneResult`.

The same loop as pruning (AMP, DDP, resume), optional knowledge distillation from a teacher."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..data import DataBundle
from ..errors import P3BError
from ..io import write_json
from .config import TrainConfig
from .trainer import CKPT, Trainer, write_metrics

_log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model: nn.Module  # the fine-tuned model (same object that was passed in)
    metrics: list[dict[str, Any]]  # every metrics.jsonl record
    out_dir: Path  # folder holding the saved model, metrics.jsonl, checkpoint.pt


def fit_head(model: nn.Module, data: DataBundle) -> None:
    """Re-initialise the classifier when the data has a different class count than the model."""
    if data.num_classes != model.num_classes:
        _log.warning("model has %d classes, data %s has %d: classifier head re-initialised",
                     model.num_classes, data.name, data.num_classes)
        model.reset_classifier(data.num_classes)


def finetune(model: nn.Module, data: DataBundle, cfg: TrainConfig | None = None,
             out_dir: str | os.PathLike | None = None, teacher: nn.Module | None = None,
             save: Callable[[nn.Module, Path], Any] | None = None) -> FinetuneResult:
    """Recovery fine-tuning without pruning (the same loop: AMP, DDP, resume); optional KD.

    `save(model, out_dir)` writes the model (e.g. slim.save_slim, which replaces out_dir
    atomically); metrics.jsonl, train_config.json and checkpoint.pt are written after it."""
    cfg = cfg or TrainConfig()
    out = Path(out_dir if out_dir is not None else (cfg.resume or ""))
    if not str(out):
        raise P3BError("finetune needs an output folder (--out DIR)")
    if cfg.resume is None and (out / CKPT).exists():
        raise P3BError(f"{out} already holds a fine-tuning run; pass --resume {out} or choose another --out")
    fit_head(model, data)
    trainer = Trainer(model, data, cfg, out, None, teacher)
    try:
        metrics = trainer.fit()
        if trainer.dist.master and save is not None:
            save(model, out)
        trainer.save_checkpoint()  # again: `save` may have replaced the folder
        if trainer.dist.master:
            write_metrics(out / "metrics.jsonl", metrics)
            write_json(out / "train_config.json", {"config": cfg.to_dict(), "data": data.name,
                                                   "teacher": teacher is not None})
    finally:
        trainer.close()
    return FinetuneResult(model=model, metrics=metrics, out_dir=out)
