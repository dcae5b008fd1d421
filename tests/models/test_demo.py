"""The shipped demo source checkpoint: present, small, accurate on its source data, transferable."""
from __future__ import annotations

import pytest
import torch

from p3b_deploy.models import demo as sources
from p3b_deploy.data import build_loaders
from p3b_deploy.errors import CheckpointError
from p3b_deploy.train.metrics import top1 as _top1
from p3b_deploy.models.demo import DEMO_MODEL, demo_checkpoint_info, demo_checkpoint_path
from p3b_deploy.models.vit import load_model, read_checkpoint

torch.set_num_threads(1)


def test_checkpoint_is_small_fp16_safetensors():
    path = demo_checkpoint_path()
    assert path.suffix == ".safetensors" and path.stat().st_size < 4_000_000
    state = read_checkpoint(path)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert sum(v.numel() for v in state.values()) == sum(
        p.numel() for p in load_model(DEMO_MODEL).state_dict().values())
    info = demo_checkpoint_info()
    assert info["model"] == DEMO_MODEL and info["source_data"] == "mnist5k"
    for key in ("seed", "epochs", "command", "torch", "timm", "date", "config"):
        assert key in info
    assert info["bytes"] == path.stat().st_size


# The shipped checkpoint reaches 95.2% on the mnist5k val split (see its sidecar); the floor
# guards against a broken or random checkpoint.
MIN_SOURCE_TOP1 = 94.0


def test_checkpoint_accuracy_on_mnist5k_val():
    """The whole fixed mnist5k val split (1000 images): above the floor, equal to the sidecar."""
    model = load_model(DEMO_MODEL, checkpoint=demo_checkpoint_path())
    val = build_loaders("mnist5k", model, batch_size=250, seed=0).val
    assert len(val.dataset) == 1000
    top1 = _top1(model, val)
    assert top1 >= MIN_SOURCE_TOP1
    assert abs(top1 - demo_checkpoint_info()["val_top1"]) <= 0.2  # what the training tool measured


def test_transfer_to_digits_reuses_backbone_and_head():
    ckpt = read_checkpoint(demo_checkpoint_path())
    model = load_model(DEMO_MODEL, checkpoint=demo_checkpoint_path(), num_classes=10)
    for k in ("blocks.5.mlp.fc1.weight", "head.weight", "pos_embed"):  # 10 classes: head kept too
        assert torch.equal(model.state_dict()[k], ckpt[k].float())
    data = build_loaders("digits", model, batch_size=64, seed=0)
    assert data.num_classes == 10 and len(data.val.dataset) == 359
    # MNIST features carry over to the 8x8 UCI digits before any fine-tuning: measured 37.6% on
    # the digits val split (chance 10%; the same model with random weights 10.6%)
    assert _top1(model.eval(), data.val) >= 30.0


def test_missing_asset_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sources, "_ASSET", "no_such_file.safetensors")
    with pytest.raises(CheckpointError, match="tools/train_source.py"):
        demo_checkpoint_path()
