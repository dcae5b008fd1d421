"""The demo source checkpoint shipped with the package (the offline default of every stage).

`vit_nano_patch4_16` (depth 12, 16x16 input, ~10 M MACs) trained from scratch on MNIST-5k by `tools/train_source.py` (seeded),
stored as fp16 safetensors in p3b_deploy/assets/ with a JSON sidecar (seed, schedule, val top-1,
versions, date, command). The demo then adapts it to the UCI digits target.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

DEMO_MODEL = "vit_nano_patch4_16"  # timm name (registered by p3b_deploy.models)
DEMO_SOURCE_DATA = "mnist5k"  # the data set it was trained on
_ASSET = "vit_nano_mnist5k.safetensors"
_REGEN = ("python tools/train_source.py --model vit_nano_patch4_16 --epochs 20 --lr 0.001 "
          "--out p3b_deploy/assets/vit_nano_mnist5k.safetensors")


def demo_checkpoint_path() -> Path:
    """Path of the packaged demo checkpoint; CheckpointError if the install lacks it."""
    path = Path(__file__).resolve().parents[1] / "assets" / _ASSET
    if not path.is_file():
        raise CheckpointError(f"the demo source checkpoint is missing from this install ({path}); "
                              f"reinstall p3b-deploy or regenerate it: {_REGEN}")
    return path


def demo_checkpoint_info() -> dict[str, Any]:
    """The checkpoint's sidecar (seed, epochs, val top-1 on mnist5k, versions, date, command)."""
    side = demo_checkpoint_path().with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the demo checkpoint's sidecar {side}: {e}") from None
