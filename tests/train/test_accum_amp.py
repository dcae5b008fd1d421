"""Gradient accumulation and mixed precision of the training loop (CPU)."""
from __future__ import annotations

import pytest
import torch

from p3b_deploy.data import build_loaders
from p3b_deploy.models.vit import load_model
from p3b_deploy.train import TrainConfig, finetune
from p3b_deploy.train.trainer import amp_dtype

torch.set_num_threads(1)


def _first_step(monkeypatch, tmp_path, batch: int, accum: int, **kw):
    """Gradients the optimizer sees at the first step, and the Linear output dtypes in training."""
    grads, dtypes = [], set()
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        if not grads:
            grads.extend(p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                         if p.grad is not None)
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    torch.manual_seed(0)
    model = load_model("vit_pico_patch4_32", img_size=16)
    hook = model.blocks[0].mlp.fc1.register_forward_hook(
        lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
    data = build_loaders("digits", model, batch_size=batch, seed=0, augment=False)
    cfg = TrainConfig(batch_size=batch, grad_accum=accum, max_steps=1, epochs=0.2, eval_every=100.0,
                      progress=False, label_smoothing=0.0, **kw)
    finetune(model, data, cfg, tmp_path / f"b{batch}x{accum}_{kw.get('amp', 'auto')}")
    hook.remove()
    return grads, dtypes


def test_grad_accum_2_x_b_equals_batch_2b(monkeypatch, tmp_path):
    """Accumulating 2 micro-batches of 8 gives the gradient of one batch of 16 (the same 16
    images: the epoch permutation is cut into consecutive batches). Tolerance: float32 sums in
    another order, 1e-4 of each tensor's largest entry; a missing 1/accum scaling is 2x off."""
    g_acc, _ = _first_step(monkeypatch, tmp_path, batch=8, accum=2)
    g_big, _ = _first_step(monkeypatch, tmp_path, batch=16, accum=1)
    assert len(g_acc) == len(g_big) > 50
    for a, b in zip(g_acc, g_big):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-9
    total = sum(float(b.abs().sum()) for b in g_big)
    assert total > 0  # the comparison is not between zeros


def test_amp_dtype_choice_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype(TrainConfig(amp="auto"), cpu) is None  # fp32 on CPU unless asked
    assert amp_dtype(TrainConfig(amp="off"), cpu) is None
    assert amp_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert amp_dtype(TrainConfig(amp="fp16"), cpu) is torch.float16


def test_cpu_bf16_training_runs_in_bf16(monkeypatch, tmp_path):
    """`--amp bf16` on a CPU: the forward pass runs in bfloat16 and the step is close to fp32."""
    g16, dt16 = _first_step(monkeypatch, tmp_path, batch=16, accum=1, amp="bf16", device="cpu")
    g32, dt32 = _first_step(monkeypatch, tmp_path, batch=16, accum=1, amp="auto", device="cpu")
    assert dt16 == {torch.bfloat16} and dt32 == {torch.float32}
    assert all(g.dtype == torch.float32 for g in g16)  # master weights and grads stay fp32
    num = sum(float((a - b).norm() ** 2) for a, b in zip(g16, g32)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in g32) ** 0.5
    assert num / den < 0.1  # bf16 has ~3 significant digits: the same gradient, roughly
    assert num > 0  # and it really ran in another precision
