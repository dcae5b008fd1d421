"""Small evaluation helpers shared by tools, tests and the pipeline."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def top1(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent of `model` (put in eval mode) over `loader`."""
    model.eval()
    correct = n = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return 100.0 * correct / n
