"""Torch-Pruning baselines: importance -> channels, budget accuracy, and one run through the trainer."""
from __future__ import annotations

import pytest
import torch

from p3b_deploy.pruning.methods import (METHODS, create_method, plan_from_scores, tp_channel_scores,
                                  tp_groups)
from p3b_deploy.models.vit import describe, load_model, nonblock_params

torch.set_num_threads(1)

TP_NAMES = ("tp-taylor", "tp-taylor-global", "tp-magnitude", "tp-magnitude-global")
ZERO_HD = [3, 17, 30]  # head_dim channels zeroed in layer 1
ZERO_HID = [0, 5, 100, 383]  # MLP hidden channels zeroed in layer 2


def _model_with_dead_channels() -> torch.nn.Module:
    """vit_pico with a few channels whose weights are exactly zero (q, k, v of every head + proj)."""
    torch.manual_seed(0)
    m = load_model("vit_pico_patch4_32")
    H, hd = 3, 32
    with torch.no_grad():
        for p in m.parameters():  # leave timm's tiny init: make every group clearly non-zero
            p.add_(0.02 * torch.randn_like(p))
        at = m.blocks[1].attn
        for s in range(3):
            for h in range(H):
                rows = [s * H * hd + h * hd + j for j in ZERO_HD]
                at.qkv.weight[rows] = 0
                at.qkv.bias[rows] = 0
        for h in range(H):
            at.proj.weight[:, [h * hd + j for j in ZERO_HD]] = 0
        mlp = m.blocks[2].mlp
        mlp.fc1.weight[ZERO_HID] = 0
        mlp.fc1.bias[ZERO_HID] = 0
        mlp.fc2.weight[:, ZERO_HID] = 0
    return m


@pytest.fixture(scope="module")
def dead():
    m = _model_with_dead_channels()
    groups = tp_groups(m)
    x = torch.randn(8, 3, 32, 32)
    torch.nn.functional.cross_entropy(m(x), torch.arange(8) % 10).backward()
    return m, groups


def test_registry_names():
    for name in TP_NAMES:
        assert create_method(name).name == name
    assert {"p3b", "uniform", "dense"} <= set(METHODS)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_zeroed_channels_score_zero_and_go_first(dead, criterion):
    m, groups = dead
    scores = tp_channel_scores(m, groups, criterion)
    a1, h2 = scores[1][0], scores[2][1]
    assert a1.shape == (32,) and h2.shape == (384,)
    assert torch.all(a1[ZERO_HD] == 0) and torch.all(a1[[j for j in range(32) if j not in ZERO_HD]] > 0)
    assert torch.all(h2[ZERO_HID] == 0) and (h2 > 0).sum() == 384 - len(ZERO_HID)
    assert torch.allclose(a1.mean(), torch.tensor(1.0)) and torch.allclose(h2.mean(), torch.tensor(1.0))
    spec = describe(m)
    plan = plan_from_scores(spec, scores, 0.3, nonblock_params(m), scope="uniform")
    kept_hd, kept_hid = plan.layers[1].attn.qk, plan.layers[2].mlp.hidden
    assert kept_hd == plan.layers[1].attn.v
    assert not set(ZERO_HD) & set(kept_hd) and not set(ZERO_HID) & set(kept_hid)
    # within a group the kept channels are exactly the top-scoring ones
    top = torch.argsort(h2, descending=True, stable=True)[: len(kept_hid)].sort().values.tolist()
    assert kept_hid == top


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.85])
def test_plan_hits_param_budget(dead, scope, ratio):
    m, groups = dead
    spec, other = describe(m), nonblock_params(m)
    plan = plan_from_scores(spec, tp_channel_scores(m, groups, "magnitude"), ratio, other, scope=scope)
    dense = sum(p.numel() for p in m.parameters())
    assert plan.params["dense"] == dense
    target = (1 - ratio) * dense
    assert abs(plan.params["kept"] - target) / target < 0.01
    assert plan.params["kept"] == plan.counts(spec, other).params
    assert not any(L.attn.removed or L.mlp.removed for L in plan.layers)
    if scope == "uniform":  # the same fraction of channels in every group
        fr_hd = {len(L.attn.qk or range(32)) for L in plan.layers}
        assert abs(fr_hd.copy().pop() / 32 - len(plan.layers[0].mlp.hidden) / 384) <= 1 / 32
        fr_hid = {len(L.mlp.hidden or range(384)) for L in plan.layers}
        assert len(fr_hd) == 1 and len(fr_hid) == 1


def test_global_takes_more_from_a_group_with_dead_channels():
    """Global ranking: a group whose scores are mostly zero loses those channels first."""
    torch.manual_seed(0)
    spec = describe(load_model("vit_pico_patch4_32"))
    scores = [(torch.rand(32) + 0.5, torch.rand(384) + 0.5) for _ in range(spec.depth)]
    scores[4] = (scores[4][0], torch.cat([torch.zeros(200), torch.rand(184) + 0.5]))
    plan = plan_from_scores(spec, scores, 0.2, 12_000, scope="global")
    kept = [len(L.mlp.hidden or range(384)) for L in plan.layers]
    assert kept[4] <= 184 and set(range(200)).isdisjoint(plan.layers[4].mlp.hidden)
    assert min(k for i, k in enumerate(kept) if i != 4) > kept[4]


def test_one_shot_run_through_trainer(tmp_path):
    """tp-magnitude via the trainer: plan at --prune-start, hard masks kept to the end."""
    from p3b_deploy.data import build_loaders
    from p3b_deploy.pruning import P3BConfig, prune
    torch.manual_seed(0)
    model = load_model("vit_pico_patch4_32")
    data = build_loaders("digits", model, batch_size=64, seed=0)
    cfg = P3BConfig(method="tp-magnitude", prune_ratio=0.5, epochs=4 / 22, start_epoch=2 / 22,
                    sparse_epoch=2 / 22, final_epoch=2 / 22, progress=False, lr=1e-4)
    res = prune(model, data, cfg, tmp_path / "run")
    updates = [r for r in res.metrics if r["event"] == "mask_update"]
    assert len(updates) == 1 and updates[0]["step"] == 2 and updates[0]["phase"] == "one-shot"
    target = 0.5 * res.plan.params["dense"]
    assert abs(res.plan.params["kept"] - target) / target < 0.01
    assert res.plan.meta["method"] == "tp-magnitude" and res.plan.meta["criterion"] == "magnitude"
    assert (tmp_path / "run" / "plan.json").is_file()
    hard = [r for r in res.metrics if r["event"] == "final_hard_masks"][0]
    last = [r for r in res.metrics if r["event"] == "eval"][-1]
    assert hard["top1"] == last["top1"]  # masks were already hard: same model, same accuracy
