"""Train a demo *source* checkpoint: a small timm ViT from scratch on a built-in data set.

This is the pretrained model the offline demo and the accuracy benchmark adapt to the UCI digits
target. Seeded and single-threaded by default, so the same command gives the same weights on the
same machine/versions. Output: fp16 safetensors (a few MB) + a JSON sidecar with seed, schedule,
val top-1 (measured on the fp16-rounded weights), versions, date and the exact command.

    python tools/train_source.py    # defaults reproduce p3b_deploy/assets/vit_nano_mnist5k.safetensors
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from p3b_deploy.data import build_loaders
from p3b_deploy.io import atomic_path, write_json
from p3b_deploy.train.metrics import top1 as evaluate
from p3b_deploy.models.vit import load_model

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "p3b_deploy" / "assets" / "vit_nano_mnist5k.safetensors"


@dataclass
class SourceConfig:
    model: str = "vit_nano_patch4_16"  # timm model name (registered by p3b_deploy.vit)
    data: str = "mnist5k"  # built-in source data set (fixed stratified split)
    epochs: int = 20  # training epochs
    batch_size: int = 64  # images per optimizer step
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms/biases/tokens)
    warmup_epochs: float = 1.0  # linear warm-up before the cosine decay
    min_lr: float = 1e-5  # cosine floor
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    clip_grad: float = 1.0  # max global gradient norm (a deep ViT from scratch needs it early on)
    seed: int = 0  # torch + data-order seed
    threads: int = 1  # torch CPU threads (1 = bit-reproducible on one machine)


def _param_groups(model: nn.Module, wd: float) -> list[dict]:
    """No weight decay on 1-d params (norms, biases) and tokens/pos embed, as timm does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, warmup: int, cfg: SourceConfig) -> float:
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def train(cfg: SourceConfig, log=print) -> tuple[nn.Module, list[dict]]:
    """Train from scratch; returns the fp32 model and a per-epoch history."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    data = build_loaders(cfg.data, model, batch_size=cfg.batch_size, seed=cfg.seed)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(data.train)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    history, step, t0 = [], 0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum = 0.0
        for x, y in data.train:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, cfg)
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            loss_sum += loss.item()
            step += 1
        top1 = evaluate(model, data.val)
        history.append({"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "val_top1": top1,
                        "elapsed_s": round(time.time() - t0, 1)})
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / steps_per_epoch:.4f} "
            f"val top-1 {top1:.2f}% ({time.time() - t0:.0f}s)")
    return model, history


def save_checkpoint(model: nn.Module, cfg: SourceConfig, history: list[dict], out: Path,
                    command: str) -> dict:
    """Write fp16 safetensors + sidecar JSON (val top-1 re-measured on the fp16 weights)."""
    import timm
    from safetensors.torch import save_file
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"model": cfg.model, "source_data": cfg.data})
        tmp.chmod(0o644)  # a package asset: readable by everyone (mkstemp creates 0600)
    fp16_model = load_model(cfg.model, checkpoint=out)
    val = build_loaders(cfg.data, fp16_model, batch_size=256, seed=cfg.seed).val
    meta = {
        "model": cfg.model, "source_data": cfg.data, "seed": cfg.seed, "epochs": cfg.epochs, "config": asdict(cfg),
        "val_top1_fp32": history[-1]["val_top1"], "val_top1": evaluate(fp16_model, val),
        "val_images": len(val.dataset), "train_seconds": history[-1]["elapsed_s"],
        "history": history, "dtype": "float16", "bytes": out.stat().st_size,
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
    }
    write_json(out.with_suffix(".json"), meta)
    out.with_suffix(".json").chmod(0o644)
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SourceConfig()
    for name, val in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(val), default=val, help=f"(default: {val})")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output .safetensors path (default: the shipped asset {DEFAULT_OUT.name}, only for the "
                        f"shipped model {defaults.model} on {defaults.data})")
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    cfg = SourceConfig(**args)
    if out is None:
        if (cfg.model, cfg.data) != (defaults.model, defaults.data):
            print(f"error: {cfg.model} on {cfg.data} is not the shipped demo source; pass --out PATH "
                  "(the shipped asset is only rewritten by the default model and data)", file=sys.stderr)
            return 2
        out = DEFAULT_OUT
    model, history = train(cfg)
    command = "python tools/train_source.py " + shlex.join(argv)
    meta = save_checkpoint(model, cfg, history, out, command.strip())
    print(f"saved {out} ({meta['bytes'] / 1e6:.2f} MB), val top-1 fp16 {meta['val_top1']:.2f}% "
          f"(fp32 {meta['val_top1_fp32']:.2f}%), {meta['train_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
