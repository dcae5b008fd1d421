"""Data layer: built-in offline sets (fixed splits, shapes, normalisation) and clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from p3b_deploy.data import InputConfig, build_loaders, builtin_split
from p3b_deploy.errors import DataError

CFG = InputConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("name,n,n_val", [("digits", 1797, 359), ("mnist5k", 5000, 1000)])
def test_builtin_split_fixed_and_stratified(name, n, n_val):
    a, b = builtin_split(name), builtin_split(name)
    assert np.array_equal(a["train"], b["train"]) and np.array_equal(a["val"], b["val"])
    assert len(a["val"]) == n_val and len(a["train"]) + len(a["val"]) == n
    assert not set(a["train"]) & set(a["val"])


def test_digits_loaders_shapes_and_values():
    b = build_loaders("digits", input_cfg=CFG, batch_size=16, seed=0, augment=False)
    assert b.num_classes == 10 and b.class_names[3] == "3"
    x, y = next(iter(b.val))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # normalised from [0,1] with mean/std 0.5: values in [-1, 1], background at -1
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6 and x.amin().item() == pytest.approx(-1.0)
    assert torch.equal(x[:, 0], x[:, 1])  # grey replicated over channels
    # val is deterministic, train order depends on the seed
    x2, _ = next(iter(build_loaders("digits", input_cfg=CFG, batch_size=16, seed=0, augment=False).val))
    assert torch.equal(x, x2)
    def first_labels(seed):
        return next(iter(build_loaders("digits", input_cfg=CFG, batch_size=16, seed=seed, augment=False).train))[1]
    assert torch.equal(first_labels(1), first_labels(1))  # same seed, same order
    assert not torch.equal(first_labels(1), first_labels(2))  # another seed, another order


def test_uses_model_data_config():
    from p3b_deploy.models.vit import load_model
    m = load_model("deit_tiny_patch16_224", img_size=48)
    cfg = InputConfig.from_model(m)
    assert cfg.size == (48, 48) and cfg.mean == pytest.approx((0.485, 0.456, 0.406))


def test_missing_and_bad_data(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        build_loaders(str(tmp_path / "nope"), input_cfg=CFG)
    (tmp_path / "root" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no val/ folder"):
        build_loaders(str(tmp_path / "root"), input_cfg=CFG)
    (tmp_path / "root" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="bad ImageFolder"):  # empty class folder
        build_loaders(str(tmp_path / "root"), input_cfg=CFG)
    with pytest.raises(DataError, match="--data-root"):
        build_loaders("cifar10", input_cfg=CFG)
    with pytest.raises(DataError, match="--download"):
        build_loaders("cifar10", root=str(tmp_path), input_cfg=CFG)


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    b = build_loaders(str(tmp_path), input_cfg=CFG, batch_size=4)
    x, y = next(iter(b.train))
    assert b.class_names == ["a", "b"] and x.shape == (4, 3, 32, 32)
    assert len(b.val.dataset) == 6
