"""The generic fine-tuning engine: TrainConfig, the Trainer loop (AMP, grad accumulation, torchrun
DDP, resumable checkpoints, optional distillation) and `finetune` for slim models."""
from __future__ import annotations

import importlib

from .config import TrainConfig

_LAZY = {"finetune": "api", "FinetuneResult": "api", "fit_head": "api", "Trainer": "trainer",
         "top1": "metrics"}

__all__ = ["TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
