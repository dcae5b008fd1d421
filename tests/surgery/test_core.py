"""Surgery is exact: slim model == dense model with the pruned weights zeroed (tests/reference.py,
independent of the gates that `verify_slim` uses), on both attention paths (fused SDPA and the
explicit softmax), with a fresh model per test (no shared mutable state such as `fused_attn`)."""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch.nn as nn

from plans import random_plan, randomize_
from reference import zero_pruned
from p3b_deploy import Plan, describe, slim
from p3b_deploy.errors import ModelError, PlanError, SurgeryError
from p3b_deploy.models.gates import mask_model
from p3b_deploy.surgery.core import (IdentityBranch, SlimAttention, SlimBlock, SlimMlp, round_plan,
                                verify_slim)
from p3b_deploy.models.vit import nonblock_params

torch.set_num_threads(1)

MODELS = {
    "vit_pico_patch4_32": {},
    "deit_tiny_patch16_224": {"img_size": 64},
    "vit_small_patch16_224": {"img_size": 32},
    "deit_tiny_distilled_patch16_224": {"img_size": 32},
    "deit3_small_patch16_224": {"img_size": 32},  # layer scale
}


@functools.lru_cache(maxsize=None)
def _pristine(name: str) -> nn.Module:
    return randomize_(timm.create_model(name, **MODELS[name]), seed=len(name)).eval()


def _get(name: str) -> nn.Module:
    """A fresh randomised dense model (a copy: tests may flip flags or edit weights freely)."""
    return copy.deepcopy(_pristine(name))


def _input(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    s = describe(model)
    return torch.randn(batch, s.in_chans, *s.img_size, generator=torch.Generator().manual_seed(seed))


def _set_fused(model: nn.Module, fused: bool) -> int:
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
            n += 1
    return n


@torch.no_grad()
def _out(model: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    assert _set_fused(model, fused) > 0 or not any(isinstance(m, SlimAttention) for m in model.modules())
    return model(x)


def _gated(model: nn.Module, plan: Plan) -> nn.Module:
    """The package's own reference (hooks with 0/1 gates), as verify_slim builds it."""
    ref = copy.deepcopy(model).eval()
    mask_model(ref, plan)
    return ref


def assert_exact(dense: nn.Module, small: nn.Module, plan: Plan, *, plan_matters: bool = True,
                 tol: float = 1e-4) -> None:
    """slim == weight-zeroed reference on the fused and the unfused attention path, relative to
    the output's magnitude; and the plan changes the output (else the comparison proves nothing)."""
    ref, x = zero_pruned(dense, plan), _input(dense)
    for fused in (True, False):
        want, got, base = _out(ref, x, fused), _out(small, x, fused), _out(copy.deepcopy(dense), x, fused)
        mag = max(1.0, float(want.abs().max()))
        if plan_matters:
            assert float((want - base).abs().max()) > 1e-2 * mag, fused
        assert float((got - want).abs().max()) <= tol * mag, (fused, float((got - want).abs().max()))


def extreme_plan(spec) -> Plan:
    """A whole layer removed, single channels everywhere, one head, qk != v, mixed with random."""
    D, H, hd, hid = spec.embed_dim, spec.num_heads, spec.head_dim, spec.mlp_hidden
    plan = random_plan(spec, seed=7, keep=0.3, remove_prob=0.0)
    L0, L1, L2 = plan.layers[0], plan.layers[1], plan.layers[2]
    L0.attn.removed = L0.mlp.removed = True  # whole layer removed
    L1.attn.in_, L1.attn.heads, L1.attn.qk, L1.attn.v, L1.attn.out = [D - 1], [H - 1], [0], [hd - 1], [3]
    L1.mlp.in_, L1.mlp.hidden, L1.mlp.out = [5], [hid - 1], [0]
    L2.attn.in_, L2.attn.heads, L2.attn.qk, L2.attn.v, L2.attn.out = None, [0], None, list(range(0, hd, 3)), None
    L2.mlp.in_, L2.mlp.hidden, L2.mlp.out = None, list(range(1, hid, 2)), None
    plan.validate(spec)
    return plan


def _plan(kind: str, spec) -> Plan:
    if kind == "dense":
        return Plan.dense(spec)
    if kind == "extreme":
        return extreme_plan(spec)
    return random_plan(spec, seed=sum(map(ord, spec.name)), keep=0.5, remove_prob=0.15)


@pytest.mark.parametrize("kind", ["random", "extreme", "dense"])
@pytest.mark.parametrize("name", list(MODELS))
def test_slim_equals_masked(name: str, kind: str) -> None:
    dense = _get(name)
    spec = describe(dense)
    plan = _plan(kind, spec)
    small = slim(dense, plan, verify=False)
    assert_exact(dense, small, plan, plan_matters=kind != "dense")
    # the gates (verify_slim's reference) agree with the weight-zeroed reference
    x = _input(dense)
    for fused in (True, False):
        want, gated = _out(zero_pruned(dense, plan), x, fused), _out(_gated(dense, plan), x, fused)
        assert float((gated - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
    # parameter count is exactly the plan's
    n = sum(p.numel() for p in small.parameters())
    assert n == plan.counts(spec, nonblock_params(dense)).params
    assert n == small.p3b_slim_config.params["slim"] == small.p3b_slim_config.get_plan().params["kept"]
    if kind == "dense":
        assert n == sum(p.numel() for p in dense.parameters())


def test_input_untouched_and_timm_interface() -> None:
    dense = _get("deit_tiny_distilled_patch16_224")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    small = slim(dense, extreme_plan(describe(dense)))
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    assert all(type(b).__name__ == "Block" for b in dense.blocks)
    assert type(small) is type(dense) and all(isinstance(b, SlimBlock) for b in small.blocks)
    assert isinstance(small.blocks[0].attn, IdentityBranch) and isinstance(small.blocks[0].mlp, IdentityBranch)
    x = _input(dense)
    with torch.no_grad():
        feats = small.forward_features(x)
        assert feats.shape == (2, describe(dense).num_tokens, 192)
        assert torch.allclose(small.forward_head(feats), small(x))
    assert small.num_classes == dense.num_classes and small.pretrained_cfg == dense.pretrained_cfg
    assert small.p3b_slim_config.verified_max_abs_diff < 1e-4


def test_index_ops_only_where_needed() -> None:
    dense = _get("vit_pico_patch4_32")
    spec = describe(dense)
    plan = Plan.dense(spec)
    plan.layers[0].attn.heads, plan.layers[0].attn.out = [1], list(range(10))
    plan.layers[0].mlp.in_ = list(range(0, 96, 2))
    plan.layers[1].mlp.in_ = list(range(96))  # a full list is "all kept": no gather
    small = slim(dense, plan)
    b0, b1 = small.blocks[0], small.blocks[1]
    assert b0.attn.in_idx is None and b0.attn.out_idx.tolist() == list(range(10))
    assert b0.mlp.in_idx.dtype == torch.int64 and b0.mlp.out_idx is None
    assert b1.mlp.in_idx is None and b1.attn.in_idx is None
    assert b0.attn.num_heads == 1 and b0.attn.scale == pytest.approx(32 ** -0.5)
    assert b0.attn.qkv.weight.shape == (3 * 32, 96) and b0.attn.proj.weight.shape == (10, 32)


def test_dense_residual_io_is_exact_and_index_free() -> None:
    dense = _get("deit3_small_patch16_224")
    spec = describe(dense)
    plan = random_plan(spec, seed=3, remove_prob=0.2)
    small = slim(dense, plan, residual_io="dense", verify=False)
    assert not [n for n, _ in small.named_buffers() if n.endswith("_idx")]
    assert small.p3b_slim_config.residual_io.count("dense") == sum(
        not (L.attn.removed) for L in plan.layers) + sum(not L.mlp.removed for L in plan.layers)
    assert verify_slim(dense, small, plan) < 1e-4 * 10
    assert_exact(dense, small, plan)
    mixed = slim(dense, plan, residual_io=["index", "dense"] * spec.depth)
    assert mixed.p3b_slim_config.verified_max_abs_diff is not None
    assert_exact(dense, mixed, plan)
    with pytest.raises(SurgeryError, match="residual_io"):
        slim(dense, plan, residual_io="gather")


def test_wrong_scale_or_index_is_caught() -> None:
    """The comparison can fail: the default SDPA scale (new head_dim) or a shifted index is caught."""
    dense = _get("vit_pico_patch4_32")
    plan = Plan.dense(describe(dense))
    for L in plan.layers:
        L.attn.qk = list(range(8))  # head_dim 32 -> qk 8: default scale would be 1/sqrt(8)
    small = slim(dense, plan)
    x = _input(dense)
    want = _out(zero_pruned(dense, plan), x, True)
    assert_exact(dense, small, plan)
    wrong = copy.deepcopy(small)
    for m in wrong.modules():
        if isinstance(m, SlimAttention):
            m.scale = m.qk_dim ** -0.5
    for fused in (True, False):
        assert float((_out(wrong, x, fused) - want).abs().max()) > 1e-2 * max(1.0, float(want.abs().max()))
    with pytest.raises(SurgeryError, match="differs"):
        verify_slim(dense, wrong, plan)
    plan2 = random_plan(describe(dense), seed=11, remove_prob=0.0)
    bad = slim(dense, plan2)
    blk = next(b for b in bad.blocks if b.mlp.out_idx is not None)
    blk.mlp.out_idx = (blk.mlp.out_idx + 1) % 96
    with pytest.raises(SurgeryError, match="differs"):
        verify_slim(dense, bad, plan2)


def test_round_plan() -> None:
    spec = describe(_get("vit_pico_patch4_32"))
    plan = random_plan(spec, seed=5, remove_prob=0.0)
    scores = {"L0.mlp_hidden": [float(j % 7) for j in range(384)]}
    r = round_plan(plan, 8, importance=scores)
    assert r.meta["round_to"] == 8 and r.params is None
    for L, R in zip(plan.layers, r.layers):
        for a, b, n in ((L.attn.in_, R.attn.in_, 96), (L.attn.qk, R.attn.qk, 32), (L.attn.v, R.attn.v, 32),
                        (L.mlp.hidden, R.mlp.hidden, 384), (L.mlp.out, R.mlp.out, 96)):
            if a is None:
                assert b is None
                continue
            got = n if b is None else len(b)
            assert got == min(n, -(-len(a) // 8) * 8) and set(a) <= set(b or range(n))
        assert R.attn.heads == L.attn.heads  # heads are not rounded
    added = sorted(set(r.layers[0].mlp.hidden) - set(plan.layers[0].mlp.hidden))
    unused = [j for j in range(384) if j not in set(plan.layers[0].mlp.hidden)]
    assert sorted(scores["L0.mlp_hidden"][j] for j in added) == sorted(
        sorted((scores["L0.mlp_hidden"][j] for j in unused), reverse=True)[:len(added)])
    # no scores: lowest unused indices
    L = plan.layers[1].mlp
    added1 = sorted(set(r.layers[1].mlp.hidden or range(384)) - set(L.hidden or range(384)))
    assert added1 == [j for j in range(384) if j not in set(L.hidden or [])][:len(added1)]
    assert plan.meta.get("round_to") is None  # input untouched
    with pytest.raises(SurgeryError, match="round_to"):
        round_plan(plan, 0)


def test_slim_round_to_is_exact_for_rounded_plan() -> None:
    dense = _get("deit_tiny_patch16_224")
    spec = describe(dense)
    plan = random_plan(spec, seed=9)
    small = slim(dense, plan, round_to=16)
    cfg = small.p3b_slim_config
    rounded = cfg.get_plan()
    assert cfg.round_to == 16 and rounded.meta["round_to"] == 16
    assert sum(p.numel() for p in small.parameters()) == rounded.counts(spec, nonblock_params(dense)).params
    for blk in small.blocks:
        if isinstance(blk.mlp, SlimMlp):
            assert blk.mlp.fc1.out_features % 16 == 0
    assert verify_slim(dense, small, rounded) <= 1e-4 * 100
    assert_exact(dense, small, rounded)


def test_qk_norm_refused_for_qk_pruning() -> None:
    dense = randomize_(timm.create_model("vit_pico_patch4_32", qk_norm=True, depth=3), seed=2).eval()
    spec = describe(dense)
    plan = random_plan(spec, seed=1, remove_prob=0.0)
    plan.layers[1].attn.qk = [0, 5]
    with pytest.raises(SurgeryError, match="qk_norm"):
        slim(dense, plan)
    ok = random_plan(spec, seed=1, remove_prob=0.0, qk=False)  # heads / v / in / out are exact
    small = slim(dense, ok)
    assert sum(p.numel() for p in small.parameters()) == ok.counts(spec, nonblock_params(dense)).params
    assert small.p3b_slim_config.verified_max_abs_diff <= 1e-4 * 10
    assert_exact(dense, small, ok)


def test_refuses_bad_inputs() -> None:
    pico = _get("vit_pico_patch4_32")
    tiny_spec = describe(_get("deit_tiny_patch16_224"))
    with pytest.raises(PlanError):
        slim(pico, Plan.dense(tiny_spec))
    small = slim(pico, Plan.dense(describe(pico)))
    with pytest.raises(ModelError):
        slim(small, Plan.dense(describe(pico)))


def test_trainable_and_compiles_without_graph_breaks() -> None:
    dense = randomize_(timm.create_model("vit_pico_patch4_32", depth=3), seed=4)
    spec = describe(dense)
    small = slim(dense, random_plan(spec, seed=2, remove_prob=0.2)).train()
    x = _input(dense)
    loss = small(x).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in small.parameters())
    small.eval()
    with torch.no_grad():
        want = small(x)
        got = torch.compile(small, backend="eager", fullgraph=True)(x)  # fullgraph: no graph breaks
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_inductor_compile_matches_eager() -> None:
    dense = randomize_(timm.create_model("vit_pico_patch4_32", depth=3), seed=4).eval()
    small = slim(dense, random_plan(describe(dense), seed=2, remove_prob=0.2))
    x = _input(dense)
    with torch.no_grad():
        assert torch.allclose(torch.compile(small)(x), small(x), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_on_cuda() -> None:
    """CUDA SDPA kernels (q/k head dim != v head dim) with the explicit original scale."""
    dense = copy.deepcopy(_get("deit3_small_patch16_224")).cuda()
    plan = extreme_plan(describe(dense))
    small = slim(dense, plan)
    masked = zero_pruned(dense, plan)
    x = _input(dense).cuda()
    for fused in (True, False):
        want, got = _out(masked, x, fused), _out(small, x, fused)
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("io", ["scatter", "pad_in", "pad_out", "auto"])
def test_scatter_pad_in_auto_residual_io_are_exact(io: str) -> None:
    dense = _get("vit_pico_patch4_32")
    spec = describe(dense)
    plan = random_plan(spec, seed=5, remove_prob=0.2)
    small = slim(dense, plan, residual_io=io)  # verify=True: raises unless within 1e-4 relative
    cfg = small.p3b_slim_config
    assert cfg.verified_max_abs_diff is not None and cfg.verified_max_abs_diff < 1e-3
    assert cfg.params["slim"] == sum(p.numel() for p in small.parameters())  # realised, padding included
    exact = slim(dense, plan, residual_io="index", verify=False).p3b_slim_config.params["slim"]
    assert (cfg.params["slim"] == exact) == all(r in ("scatter", "removed") for r in cfg.residual_io)
    assert "auto" not in cfg.residual_io and len(cfg.residual_io) == 2 * spec.depth
    if io == "scatter":
        assert cfg.params["slim"] == exact and set(cfg.residual_io) <= {"scatter", "removed"}
    assert_exact(dense, small, plan)


def test_auto_io_cost_rule() -> None:
    from p3b_deploy.surgery.core import auto_io
    # deit_small, 50% of residual dims kept: padding would add more MACs than the index ops cost
    assert auto_io(384, 192, 192, 768, 768) == "index" and auto_io(384, 192, 192, 576, 192) == "index"
    # 80% kept (measured: dense io faster than index there)
    assert auto_io(384, 307, 307, 768, 768) == "dense" and auto_io(384, 307, 307, 576, 192) == "dense"
    assert auto_io(384, 384, 384, 768, 768) == "index"  # nothing to pad: exact size
    assert auto_io(384, 380, 380, 768, 768, index_cost=0.0) == "index"
    dense = _get("vit_pico_patch4_32")
    plan = Plan.dense(describe(dense))
    plan.layers[0].mlp.in_ = list(range(1, 96))  # one input dim missing: padded read is cheaper
    plan.layers[0].attn.out = list(range(8))  # 8 of 96 written: index_add is cheaper
    small = slim(dense, plan, residual_io="auto")
    assert small.p3b_slim_config.residual_io[:2] == ["index", "dense"]
    assert small.blocks[0].mlp.in_idx is None and small.blocks[0].mlp.fc1.in_features == 96
    assert small.blocks[0].attn.out_idx.tolist() == list(range(8))
