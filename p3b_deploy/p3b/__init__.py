"""The P3B method: config, block-benefit probes, budget/schedule, masks, and the training loop.

`prune(model, data, cfg, out_dir) -> PruneResult` is the one front door; the CLI `prune` stage
and the baselines call it. Heavy modules are imported lazily.
"""
from __future__ import annotations

import importlib

from .config import P3BConfig

_LAZY = {"prune": "api", "PruneResult": "api", "finetune": "api", "FinetuneResult": "api",
         "Trainer": "trainer"}

__all__ = ["P3BConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'p3b_deploy.p3b' has no attribute {name!r}")
