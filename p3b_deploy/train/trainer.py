"""The fine-tuning loop shared by `prune` (P3B / uniform / dense) and `finetune` (slim models).

Reads top to bottom like nanoGPT's train.py: distributed set-up from torchrun's environment,
a resumable batch stream, AdamW + cosine with warm-up, AMP on CUDA, gradient accumulation, the
pruning hooks (`Pruner`), evaluation, and atomic, resumable checkpoints. Only rank 0 writes.

Determinism: the batch order of epoch e is a fixed permutation (seed, e) and the checkpoint
stores the position inside the epoch plus every rank's RNG state, so a run resumed after a kill
replays exactly the same steps as an uninterrupted one (on CPU, with in-memory data; loader
worker processes draw their own augmentation randomness and are not replayed bit-exactly).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data import DataBundle
from ..errors import CheckpointError, DataError, P3BError
from ..io import atomic_path, write_text
from .config import TrainConfig

_log = logging.getLogger(__name__)
CKPT = "checkpoint.pt"


# ------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int  # global rank (0 under plain python)
    world: int  # number of processes
    local_rank: int  # rank on this node (picks the GPU)
    device: torch.device  # where this process trains
    owns_group: bool  # we initialised torch.distributed (and must tear it down)

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Rank/world from torchrun's environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device in ("auto", "cuda"):
        dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank, world, local, dev, owns)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------------------ data stream
class EpochBatches(Sampler):
    """Batches of one rank for epoch `epoch`, starting at batch `pos` (resumable mid-epoch).

    The permutation depends only on (seed, epoch); each rank takes every world-th index, cut to
    the same length on every rank, and incomplete last batches are dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        if self.per_rank < batch_size:
            raise DataError(f"training set has {n} images: too few for batch size {batch_size} x {world} process(es)")
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return self.per_rank // self.bs

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        mine = torch.randperm(self.n, generator=g)[self.rank::self.world][: self.per_rank]
        for b in range(self.pos, len(self)):
            yield mine[b * self.bs:(b + 1) * self.bs].tolist()


def _loader(like: DataLoader, dataset: Dataset, **kw) -> DataLoader:
    """A DataLoader with the same workers/collate as `like`; its own generator, so creating an
    iterator never draws from the global RNG (which the augmentation uses)."""
    return DataLoader(dataset, num_workers=like.num_workers, pin_memory=like.pin_memory,
                      collate_fn=like.collate_fn, generator=torch.Generator().manual_seed(0), **kw)


# ------------------------------------------------------------------------------ model wrapper
class TrainNet(nn.Module):
    """The model plus auxiliary probes (P3B's benefit probes), so DDP sees one module (probe
    grads are synced too). Probes provide `tap(model)` (hooks that collect the features they
    read), `forward(features, y)` and `loss(outputs)`; the trainer knows nothing else of them."""

    def __init__(self, model: nn.Module, probes: nn.Module | None) -> None:
        super().__init__()
        self.model, self.probes = model, probes
        self.tap = probes.tap(model) if probes is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        if self.tap is None:
            return self.model(x), None
        self.tap.active = True
        try:
            logits = self.model(x)
        finally:
            self.tap.active = False
        return logits, self.probes(self.tap.take(), y)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: nn.Module, probes: nn.Module | None, cfg: TrainConfig) -> list[dict]:
    """Backbone with / without weight decay (no decay on 1-d params and tokens), probes apart."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr}]
    if probes is not None:
        groups.append({"params": list(probes.parameters()), "weight_decay": 0.0, "base_lr": float(probes.lr)})
    return [g for g in groups if g["params"]]


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 (or fp16 where bf16 is unsupported) on CUDA, fp32 on CPU unless asked otherwise."""
    if cfg.amp == "off" or (device.type != "cuda" and cfg.amp == "auto"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# ------------------------------------------------------------------------------ the loop
class Trainer:
    """One training run: `fit()` trains for cfg.epochs, pruning if a Pruner is attached.

    `pruner_factory(model, steps_per_epoch)` builds the pruning side once the device and the
    epoch length are known (None = plain fine-tuning). `teacher` enables distillation."""

    def __init__(self, model: nn.Module, data: DataBundle, cfg: TrainConfig, run_dir: str | os.PathLike,
                 pruner_factory: Callable[[nn.Module, float], Any] | None = None,
                 teacher: nn.Module | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = d = setup_distributed(cfg.device)
        torch.manual_seed(cfg.seed)  # probes are initialised identically on every rank
        self.model = model.to(d.device)
        self.teacher = teacher.to(d.device).eval() if teacher is not None else None
        # data: resumable per-rank batch stream + a per-rank shard of the validation set
        train_set = data.train.dataset
        self.sampler = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, d.rank, d.world)
        self.train_loader = _loader(data.train, train_set, batch_sampler=self.sampler)
        val_set = data.val.dataset
        val_idx = list(range(d.rank, len(val_set), d.world))
        self.val_loader = _loader(data.val, Subset(val_set, val_idx), batch_size=data.val.batch_size)
        self.steps_per_epoch = len(self.sampler) / cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise DataError(f"one epoch has {len(self.sampler)} batches: fewer than --grad-accum {cfg.grad_accum}")
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))
        # pruning side (gates, probes, scores) and the module DDP wraps
        self.pruner = pruner_factory(self.model, self.steps_per_epoch) if pruner_factory else None
        probes = self.pruner.probes if self.pruner is not None else None
        self.net = TrainNet(self.model, probes)
        self.ddp = None
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(self.net, device_ids=[d.device] if d.device.type == "cuda" else None)
        # optimisation
        self.optimizer = torch.optim.AdamW(param_groups(self.model, probes, cfg), lr=cfg.lr,
                                           fused=d.device.type == "cuda")
        self.amp = amp_dtype(cfg, d.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.eval_steps = max(1, round(cfg.eval_every * self.steps_per_epoch))
        self.ckpt_steps = cfg.ckpt_every or self.eval_steps
        # state that a checkpoint carries
        self.step, self.epoch, self.pos = 0, 0, 0
        self.metrics: list[dict[str, Any]] = []
        self.last_ckpt_step: int | None = None
        self._loss_sum, self._loss_n, self._t0, self.train_time = 0.0, 0, time.time(), 0.0
        torch.manual_seed(cfg.seed + d.rank)  # augmentation / dropout stream of this rank
        if cfg.resume:
            self.load_checkpoint(Path(cfg.resume))
        self._stream = self._batches()

    # ------------------------------------------------------------------ data
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            self.sampler.epoch, self.sampler.pos = self.epoch, self.pos
            for x, y in self.train_loader:
                self.pos += 1
                yield x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
            self.epoch, self.pos = self.epoch + 1, 0

    # ------------------------------------------------------------------ losses
    def task_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Label-smoothed CE, mixed with soft-target KL from the teacher when there is one."""
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        if self.teacher is None:
            return ce
        T, a = self.cfg.kd_temperature, self.cfg.kd_alpha
        with torch.no_grad():
            t_logits = self.teacher(x).float()
        kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(t_logits / T, -1),
                      reduction="batchmean", log_target=True) * T * T
        return a * kl + (1 - a) * ce

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> None:
        cfg, net = self.cfg, self.ddp or self.net
        net.train()
        if self.pruner is not None:
            self.pruner.begin_step(self.step)
        f = lr_factor(self.step, self.warmup_steps, self.total_steps, cfg.min_lr / cfg.lr)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        finite = torch.ones((), device=self.dist.device)
        task_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = next(self._stream)
            sync = micro == cfg.grad_accum - 1 or self.ddp is None
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                logits, ce = net(x, y)
                task = self.task_loss(logits, x, y)
                loss = task + (self.net.probes.loss(ce) if ce is not None else 0.0)
            finite *= torch.isfinite(loss.detach()).float()
            self.scaler.scale(loss / cfg.grad_accum).backward()
            if self.pruner is not None:
                self.pruner.observe(ce, self.step)
            task_sum += float(task.detach())
        if _all_reduce(finite, dist.ReduceOp.MIN).item() < 1:
            raise P3BError(self._nonfinite_message())
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.pruner is not None:
            self.pruner.after_step(self.step, grad_scale=scale)
        self._loss_sum += task_sum / cfg.grad_accum
        self._loss_n += 1

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp)

    def _nonfinite_message(self) -> str:
        last = (f"the last good checkpoint (step {self.last_ckpt_step}) in {self.run_dir} is intact; "
                f"resume with --resume {self.run_dir}" if self.last_ckpt_step is not None
                else "no checkpoint was written yet")
        return (f"non-finite loss at step {self.step + 1} (epoch {self.step / self.steps_per_epoch:.2f}); "
                f"training stopped, {last}. Try a lower --lr or --amp off")

    # ------------------------------------------------------------------ the run
    def fit(self) -> list[dict[str, Any]]:
        """Train to cfg.epochs (or cfg.max_steps), updating masks, evaluating and checkpointing."""
        cfg = self.cfg
        end = min(self.total_steps, cfg.max_steps or self.total_steps)
        bar = self._bar(end)
        while self.step < end:
            self.train_step()
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{self._loss_sum / max(1, self._loss_n):.3f}",
                                epoch=f"{self.step / self.steps_per_epoch:.2f}")
            if self.pruner is not None:
                rec = self.pruner.maybe_update(self.step)
                if rec is not None:
                    self.log(dict(rec, epoch=round(self.step / self.steps_per_epoch, 4)))
            if self.step % self.eval_steps == 0 or self.step == end:
                self.log(self.evaluate())
            if self.step % self.ckpt_steps == 0 or self.step == end:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.metrics

    def _bar(self, end: int):
        if not (self.cfg.progress and self.dist.master):
            return None
        from ..progress import progress_bar
        return progress_bar(end, initial=self.step, desc="train", unit="step")

    @torch.no_grad()
    def evaluate(self, event: str = "eval") -> dict[str, Any]:
        """Top-1 / top-5 / loss on the validation set (gates as they are), summed over ranks."""
        self.net.eval()
        s = torch.zeros(4, dtype=torch.float64, device=self.dist.device)  # loss, top1, top5, n
        for x, y in self.val_loader:
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            with self._autocast():
                logits = self.model(x).float()
            k = min(5, logits.shape[-1])
            hit = logits.topk(k, -1).indices == y[:, None]
            s += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(),
                              hit.any(-1).sum(), torch.tensor(len(y), device=s.device)]).double()
        _all_reduce(s)
        now = time.time()
        self.train_time += now - self._t0
        self._t0 = now
        n = max(1.0, float(s[3]))
        rec = {"event": event, "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "train_loss": round(self._loss_sum / max(1, self._loss_n), 6) if self._loss_n else None,
               "val_loss": round(float(s[0]) / n, 6), "top1": round(100 * float(s[1]) / n, 4),
               "top5": round(100 * float(s[2]) / n, 4), "train_time_s": round(self.train_time, 3)}
        self._loss_sum, self._loss_n = 0.0, 0
        return rec

    def log(self, rec: dict[str, Any]) -> None:
        """Append a metrics record; rank 0 rewrites metrics.jsonl atomically."""
        self.metrics.append(rec)
        if not self.dist.master:
            return
        write_metrics(self.run_dir / "metrics.jsonl", self.metrics)
        if rec["event"] != "mask_update":
            msg = (f"step {rec['step']} epoch {rec['epoch']:.2f} {rec['event']}: val top1 {rec['top1']:.2f} "
                   f"top5 {rec['top5']:.2f} loss {rec['val_loss']:.4f}")
        else:
            msg = (f"step {rec['step']}: mask update ({rec['phase']}, tau {rec['tau']:.3f}), "
                   f"kept params {rec['kept_params']:,} of {rec['dense_params']:,}")
        _log.info(msg)

    # ------------------------------------------------------------------ checkpoints
    def _rng_states(self) -> list[dict[str, Any]]:
        mine = {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None}
        if self.dist.world == 1:
            return [mine]
        out: list[Any] = [None] * self.dist.world
        dist.all_gather_object(out, mine)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"format": "p3b-checkpoint", "version": 1, "step": self.step, "epoch": self.epoch,
                "pos": self.pos, "total_steps": self.total_steps, "world": self.dist.world,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "pruner": self.pruner.state_dict() if self.pruner is not None else None,
                "metrics": self.metrics, "train_time": self.train_time,
                "loss": [self._loss_sum, self._loss_n]}

    def save_checkpoint(self) -> None:
        """Atomic checkpoint.pt (plain tensors/dicts only, read back with weights_only=True)."""
        rng = self._rng_states()
        if self.dist.master:
            state = dict(self.state_dict(), rng=rng)
            with atomic_path(self.run_dir / CKPT) as tmp:
                torch.save(state, tmp)
        self.last_ckpt_step = self.step
        if self.dist.world > 1:
            dist.barrier()

    def load_checkpoint(self, run_dir: Path) -> None:
        """Restore everything `save_checkpoint` wrote; the stream continues at the saved batch."""
        st = read_checkpoint_file(run_dir / CKPT)
        if st.get("total_steps") != self.total_steps:
            raise CheckpointError(f"{run_dir / CKPT} was written for {st.get('total_steps')} steps, this run "
                                  f"has {self.total_steps}: resume with the same data, epochs and batch size")
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        if self.pruner is not None:
            if st["pruner"] is None:
                raise CheckpointError(f"{run_dir / CKPT} holds no pruning state (a --method dense run)")
            self.pruner.load_state_dict(st["pruner"])
        self.step, self.epoch, self.pos = st["step"], st["epoch"], st["pos"]
        self.metrics, self.train_time = list(st["metrics"]), st["train_time"]
        self._loss_sum, self._loss_n = st["loss"]
        self.last_ckpt_step = self.step
        rng = st["rng"]
        if len(rng) == self.dist.world:
            torch.set_rng_state(rng[self.dist.rank]["cpu"])
            if rng[self.dist.rank]["cuda"] is not None and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(rng[self.dist.rank]["cuda"], self.dist.device)
        else:
            _log.warning("resuming on %d processes (checkpoint: %d): data order continues, "
                         "augmentation randomness does not replay exactly", self.dist.world, len(rng))
        _log.info("resumed from %s at step %d (epoch %.2f)", run_dir, self.step, self.step / self.steps_per_epoch)

    def close(self) -> None:
        """Tear down the process group if we created it."""
        if self.dist.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def read_checkpoint_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} is missing")
    try:
        st = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated / corrupt files raise many types
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(st, dict) or st.get("format") != "p3b-checkpoint":
        raise CheckpointError(f"{path} is not a p3b-deploy training checkpoint")
    return st


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    import json
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
