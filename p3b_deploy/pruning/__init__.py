"""Pruning methods behind one front door: `prune(model, data, cfg, out_dir) -> PruneResult`.

P3B (block-benefit probes, budget/schedule, masks; `pruning/p3b/`) and the baselines (uniform,
dense, Torch-Pruning Taylor/magnitude) are registered by name in `pruning/methods.py`; every
method writes the same run dir (dense weights + plan.json). Heavy modules are imported lazily.
"""
from __future__ import annotations

import importlib

from .config import P3BConfig

_LAZY = {"prune": "api", "PruneResult": "engine", "train_prune": "engine",
         "create_method": "methods", "register_method": "methods", "METHODS": "methods"}

__all__ = ["P3BConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
