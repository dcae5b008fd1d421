"""p3b.masks: soft masks, ranks, bilinear costs, the threshold search, Taylor scores, plans."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from p3b_deploy.errors import CheckpointError, P3BError
from p3b_deploy.models.gates import Gates
from p3b_deploy.pruning.config import P3BConfig
from p3b_deploy.pruning.p3b.masks import (BlockDims, TaylorScores, block_cost, dense_block_cost, gate_ranks,
                                  kept_block_cost, kept_cost, plan_from_gates, select_block, soft_mask,
                                  update_masks)
from p3b_deploy.plan import Plan
from p3b_deploy.models.vit import describe, load_model, nonblock_params
from p3b_deploy.spec import AttnDims, MlpDims, attn_macs, attn_params, count, mlp_macs, mlp_params, nonblock_macs

FACTORS = P3BConfig().gate_factors


def tiny(depth=2, D=4, heads=1, mlp_ratio=2.0, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=D, depth=depth, num_heads=heads,
                             mlp_ratio=mlp_ratio, num_classes=3)


@pytest.fixture(scope="module")
def pico():
    torch.set_num_threads(1)
    return load_model("vit_pico_patch4_32")  # D 96, 3 heads x 32, hidden 384, 65 tokens, qkv bias


# ------------------------------------------------------------------------------ soft mask + ranks
def test_soft_mask_values():
    # sigmoid(ln9 * x) = 1 / (1 + 9^-x);  n = 10, tau = 0.1 -> tau * n = 1, threshold t = 3.5
    r = torch.tensor([3.5, 4.5, 2.5, 6.0, 1.0])
    # x = (r - t) / 1 = [0, 1, -1, 2.5, -2.5] -> [0.5, 0.9, 0.1, 243/244, 1/244]
    m = soft_mask(r, 3.5, 10, 0.1)
    assert m.tolist() == pytest.approx([0.5, 0.9, 0.1, 243 / 244, 1 / 244], abs=1e-6)
    # tau 0.2, n 10: tau * n = 2 -> rank 5.5 (2 past t) gives 0.9
    assert soft_mask(torch.tensor([5.5]), 3.5, 10, 0.2).item() == pytest.approx(0.9, abs=1e-6)
    # tau 0: hard step, kept iff rank > t
    assert soft_mask(torch.tensor([1, 3, 4, 10]), 3.5, 10, 0.0).tolist() == [0, 0, 1, 1]


def test_gate_ranks():
    # ascending, ties by index: 0.1@1, 0.1@3, 0.2@2, 0.3@0 -> ranks [4, 1, 3, 2]
    assert gate_ranks(torch.tensor([0.3, 0.1, 0.2, 0.1]), 4).tolist() == [4, 1, 3, 2]
    assert gate_ranks(torch.tensor([float("nan"), 1.0, -1.0]), 3).tolist() == [2, 3, 1]  # NaN reads as 0
    assert gate_ranks(None, 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        gate_ranks(torch.ones(4), 3)


# ------------------------------------------------------------------------------ costs
def test_block_cost_hand_values_pico(pico):
    s = describe(pico)
    a, m = BlockDims(s, 0), BlockDims(s, 1)
    full_a = {"attn_in": 96, "attn_qk": 32, "attn_out": 96}
    # in: H * 3 * qk = 3 * 96 = 288; qk (q, k, v of every head): H * (3 * n_in + 3 bias) + H * n_out
    # = 3 * 291 + 288 = 1161; out: H * qk + 1 bias = 97
    assert block_cost(a, full_a) == {"attn_in": 288, "attn_qk": 1161, "attn_out": 97}
    # at n_in 50, qk 10, n_out 20: in 3*30 = 90; qk 3*(150+3) + 3*20 = 519; out 30 + 1 = 31
    assert block_cost(a, {"attn_in": 50, "attn_qk": 10, "attn_out": 20}) == {"attn_in": 90, "attn_qk": 519, "attn_out": 31}
    # hidden channel: n_in + 1 + n_out = 193; in: hidden 384; out: hidden + 1 bias = 385
    assert block_cost(m, {"mlp_in": 96, "mlp_hidden": 384, "mlp_out": 96}) == {"mlp_in": 384, "mlp_hidden": 193, "mlp_out": 385}
    # MACs, N = 65: in 65*288 = 18720; qk 65*96*9 + 2*3*65^2 + 65*3*96 = 56160 + 25350 + 18720 = 100230;
    # out 65 * 96 = 6240; hidden 65 * (96 + 96) = 12480
    assert block_cost(a, full_a, "macs") == {"attn_in": 18720, "attn_qk": 100230, "attn_out": 6240}
    assert block_cost(m, {"mlp_in": 96, "mlp_hidden": 384, "mlp_out": 96}, "macs")["mlp_hidden"] == 12480


def test_block_cost_equals_vit_count_differences(pico):
    s = describe(pico)
    a = BlockDims(s, 4)
    c = {"attn_in": 70, "attn_qk": 17, "attn_out": 33}
    base = attn_params(s, 2, AttnDims(70, 3, 17, 17, 33))
    assert block_cost(a, c)["attn_qk"] == base - attn_params(s, 2, AttnDims(70, 3, 16, 16, 33))
    assert block_cost(a, c)["attn_in"] == base - attn_params(s, 2, AttnDims(69, 3, 17, 17, 33))
    assert block_cost(a, c, "macs")["attn_out"] == attn_macs(s, 2, AttnDims(70, 3, 17, 17, 33)) - attn_macs(
        s, 2, AttnDims(70, 3, 17, 17, 32))
    mb = BlockDims(s, 5)
    cm = {"mlp_in": 10, "mlp_hidden": 200, "mlp_out": 90}
    assert block_cost(mb, cm)["mlp_hidden"] == mlp_params(s, 2, MlpDims(10, 200, 90)) - mlp_params(s, 2, MlpDims(10, 199, 90))
    assert block_cost(mb, cm, "macs")["mlp_in"] == mlp_macs(s, 2, MlpDims(10, 200, 90)) - mlp_macs(s, 2, MlpDims(9, 200, 90))
    # kept cost is vit's count for a live branch and 0 once a gate is empty; dense = vit's dense count
    assert int(kept_block_cost(mb, cm)) == mlp_params(s, 2, MlpDims(10, 200, 90))
    assert int(kept_block_cost(mb, {**cm, "mlp_hidden": 0})) == 0
    dense = count(s, 0)
    assert [dense_block_cost(BlockDims(s, b)) for b in range(24)] == list(dense.params_blocks)
    assert [dense_block_cost(BlockDims(s, b), "macs") for b in range(24)] == list(dense.macs_blocks)
    with pytest.raises(P3BError, match="budget"):
        dense_block_cost(a, "flops")


# ------------------------------------------------------------------------------ threshold search
MLP_SCORES = {"mlp_in": torch.tensor([4., 3, 2, 1]), "mlp_hidden": torch.arange(1., 9), "mlp_out": torch.tensor([1., 2, 3, 4])}
# tiny MLP block: D 4, hidden 8; kept = 8 (norm) + n_in*hid + hid + hid*n_out + n_out; dense 84.
# keys (rank/n * factor): in [1, .75, .5, .25]; hid k/8 * .75 = .09375 k; out [.25, .5, .75, 1] * 1.5
# joint order: hid1 hid2 in3 hid3 hid4 out0 hid5 in2 hid6 hid7 in1 hid8 out1 ...
# removed per prefix k: 0, 9, 18, 24 (3,6,4: kept 60), 32 (3,5,4: 52), 40 (3,4,4: 44), 45 (3,4,3: 39), 52 ...


@pytest.mark.parametrize("target,removed_in,removed_hid", [
    (30, [3], [0, 1, 2]),  # k=4 (32, off by 2) beats k=3 (24, off by 6)
    (42, [3], [0, 1, 2, 3]),  # k=5 (40, off by 2) beats k=6 (45, off by 3)
    (28, [3], [0, 1]),  # tie between k=3 (24) and k=4 (32): the smaller removal wins
    (0, [], []),
])
def test_select_block_hand_example(target, removed_in, removed_hid):
    dims = BlockDims(describe(tiny()), 1)
    assert dense_block_cost(dims) == 84
    m = select_block(MLP_SCORES, FACTORS, dims, target, tau=0.0)
    assert [j for j in range(4) if m["mlp_in"][j] == 0] == removed_in
    assert [j for j in range(8) if m["mlp_hidden"][j] == 0] == removed_hid
    assert m["mlp_out"].tolist() == [1, 1, 1, 1]


def test_select_block_fixed_residual_gates_hand_example():
    # in/out fixed: only hidden channels go. One hidden channel costs 4 (fc1 row) + 1 (bias) + 4 (fc2
    # column) = 9 params; target 30 -> 3 channels (27, off by 3) beats 4 (36, off by 6). Hidden keys
    # keep their order (ranks 1, 2, 3 = channels 0, 1, 2).
    dims = BlockDims(describe(tiny()), 1)
    m = select_block(MLP_SCORES, FACTORS, dims, 30, tau=0.0, fixed=("mlp_in", "mlp_out"))
    assert m["mlp_in"].tolist() == [1, 1, 1, 1] and m["mlp_out"].tolist() == [1, 1, 1, 1]
    assert [j for j in range(8) if m["mlp_hidden"][j] == 0] == [0, 1, 2]
    # target 80: 7 channels (63) or all 8 (branch removed: 84) -> 84 is closer (off by 4 vs 17)
    gone = select_block(MLP_SCORES, FACTORS, dims, 80, tau=0.0, fixed=("mlp_in", "mlp_out"))
    assert all(float(v.sum()) == 0 for v in gone.values())
    # target 70: 7 channels (63, off by 7) beats removal (84, off by 14); in/out still whole
    seven = select_block(MLP_SCORES, FACTORS, dims, 70, tau=0.0, fixed=("mlp_in", "mlp_out"))
    assert seven["mlp_hidden"].tolist() == [0] * 7 + [1] and seven["mlp_in"].tolist() == [1, 1, 1, 1]


def test_update_masks_without_residual_pruning_keeps_in_out(pico):
    gates = Gates(pico, describe(pico), tie_qkv=True)
    try:
        cfg = P3BConfig(prune_residual=False)
        update_masks(gates, {}, [0.4] * 24, 0.0, cfg)
        plan = plan_from_gates(gates, params_other=nonblock_params(pico))
        for L in plan.layers:
            assert L.attn.in_ is None and L.attn.out is None and L.mlp.in_ is None and L.mlp.out is None
            assert L.attn.qk is not None and L.mlp.hidden is not None
        # each block lands within half a channel of 40% of its params, so the blocks' sum is close too
        other = nonblock_params(pico)
        blocks_dense, blocks_kept = plan.params["dense"] - other, plan.params["kept"] - other
        assert abs(blocks_kept - 0.4 * blocks_dense) < 0.02 * blocks_dense
    finally:
        gates.remove()


def test_select_block_soft_values_hand_example():
    # target 30 -> k=4: hid threshold t = 3.5, n 8, tau .1: rank 4 -> 1/(1+9^(-.625)); 9^.625 = e^1.373265
    # = 3.948222 -> 3.948222/4.948222 = 0.797907;
    # in: 1 removed, t 1.5, n 4: rank 1 (channel 3) -> 1/(1+9^1.25) = 1/(1+9*sqrt 3) = 1/16.588457
    # = 0.0602829; rank 2 -> 1 - 0.0602829 = 0.9397171
    m = select_block(MLP_SCORES, FACTORS, BlockDims(describe(tiny()), 1), 30, tau=0.1)
    assert m["mlp_hidden"][3].item() == pytest.approx(0.797907, abs=1e-6)
    assert m["mlp_in"][3].item() == pytest.approx(0.0602829, abs=1e-7)
    assert m["mlp_in"][2].item() == pytest.approx(0.9397171, abs=1e-7)
    assert ((m["mlp_hidden"] >= 0.5) == torch.tensor([0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)).all()


def test_select_block_removes_branch_when_a_gate_empties():
    # target 80 of 84: prefix 11 (keeps in 1, hid 1, out 3: 8+1+1+3+3 = 16 -> removed 68) vs
    # prefix 12 (last hidden channel goes -> branch removed, 84): 84 is closer -> all gates zero
    dims = BlockDims(describe(tiny()), 1)
    hard = select_block(MLP_SCORES, FACTORS, dims, 80, tau=0.0)
    assert all(float(v.sum()) == 0 for v in hard.values())
    soft = select_block(MLP_SCORES, FACTORS, dims, 80, tau=0.1)
    # soft: everything below 0.5, but the best elements stay partly on (the branch can return):
    # top hidden rank 8, t = 8.5, n 8: 1/(1+9^(.5/.8)) = 1/4.948222 = 0.202093
    assert all(float(v.max()) < 0.5 for v in soft.values())
    assert soft["mlp_hidden"][7].item() == pytest.approx(0.202093, abs=1e-6)


@pytest.mark.parametrize("cost", ["params", "macs"])
def test_threshold_search_within_one_element(pico, cost):
    s = describe(pico)
    g = torch.Generator().manual_seed(1)
    for b in (0, 1, 6, 23):
        dims = BlockDims(s, b)
        sizes = dims.sizes()
        scores = {k: torch.rand(n, generator=g) for k, n in sizes.items()}
        dense = dense_block_cost(dims, cost)
        for kr in (0.9, 0.6, 0.3, 0.1):
            target = dense * (1 - kr)
            m = select_block(scores, FACTORS, dims, target, tau=0.1, cost=cost)
            kept = {k: int((v >= 0.5).sum()) for k, v in m.items()}
            assert all(v > 0 for v in kept.values())
            removed = dense - int(kept_block_cost(dims, kept, cost))
            one = max(block_cost(dims, {k: v + 1 for k, v in kept.items()}, cost).values())
            assert abs(removed - target) <= one / 2 + 1e-6, (b, kr, removed, target, one)


def test_factors_shift_pruning_between_gates(pico):
    # Equal (missing) scores: a threshold theta on rank/n * factor removes a fraction theta / factor
    # of each gate: mlp_hidden (0.75) loses twice the fraction mlp_out (1.5) loses, mlp_in (1.0) in between.
    dims = BlockDims(describe(pico), 1)
    m = select_block({}, FACTORS, dims, 0.3 * dense_block_cost(dims), tau=0.0)
    frac = {k: 1 - float(v.mean()) for k, v in m.items()}
    assert 0 < frac["mlp_out"] < frac["mlp_in"] < frac["mlp_hidden"]
    assert frac["mlp_hidden"] == pytest.approx(2 * frac["mlp_out"], abs=2 / 96)
    assert frac["mlp_in"] == pytest.approx(1.5 * frac["mlp_out"], abs=2 / 96)
    flat = select_block({}, {k: 1.0 for k in FACTORS}, dims, 0.3 * dense_block_cost(dims), tau=0.0)
    ff = {k: 1 - float(v.mean()) for k, v in flat.items()}
    assert ff["mlp_hidden"] == pytest.approx(ff["mlp_out"], abs=2 / 96)  # equal factors: equal fractions


# ------------------------------------------------------------------------------ Taylor scores
def test_taylor_accumulation_matches_autograd():
    model = tiny(depth=2, D=8, heads=2)
    gates = Gates(model, tie_qkv=True)
    with torch.no_grad():
        for _, p in gates.named_gates():
            p.uniform_(0.3, 1.0)  # soft values: m matters in (m * grad)^2
    names = [n for n, _ in gates.named_gates() if "heads" not in n]
    ts = TaylorScores(gates)
    assert sorted(ts.sums) == sorted(names)
    expect = {n: torch.zeros_like(p) for n, p in gates.named_gates() if n in names}
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        params = dict(gates.named_gates())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])
        for n, gr in zip(names, grads):
            expect[n] += (params[n].detach() * gr) ** 2
        (8.0 * F.cross_entropy(model(x), y)).backward()  # loss scaled by 8, as AMP's GradScaler would
        assert ts.accumulate(grad_scale=8.0)
        assert all(p.grad is None for _, p in gates.named_gates())  # consumed
    assert ts.count == 2
    mean = ts.mean()
    for n in names:
        assert torch.allclose(mean[n], expect[n] / 2, rtol=1e-4, atol=1e-12), n
    assert any(float(v.abs().sum()) > 0 for v in mean.values())
    # a non-finite step is skipped; reset clears
    params = dict(gates.named_gates())
    params[names[0]].grad = torch.full_like(params[names[0]], float("inf"))
    assert not ts.accumulate() and ts.count == 2
    ts.reset()
    assert ts.count == 0 and all(float(v.sum()) == 0 for v in ts.mean().values())


def test_taylor_state_dict_round_trip():
    gates = Gates(tiny(), tie_qkv=True)
    ts = TaylorScores(gates)
    for i, s in enumerate(ts.sums.values()):
        s.fill_(i + 0.5)
    ts.count = 7
    other = TaylorScores(Gates(tiny(), tie_qkv=True))
    other.load_state_dict(ts.state_dict())
    assert other.count == 7 and all(torch.equal(ts.sums[n], other.sums[n]) for n in ts.sums)
    bad = ts.state_dict()
    bad["sum.L0.mlp_hidden"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="shape"):
        other.load_state_dict(bad)
    with pytest.raises(CheckpointError, match="does not fit"):
        TaylorScores(Gates(tiny(depth=1), tie_qkv=True)).load_state_dict(ts.state_dict())


def test_taylor_all_reduce_single_process(tmp_path):
    import torch.distributed as dist
    gates = Gates(tiny(), tie_qkv=True)
    ts = TaylorScores(gates)
    ts.sums["L0.mlp_hidden"].fill_(2.0)
    ts.count = 3
    ts.all_reduce()  # not initialised: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ts.all_reduce()  # world 1: sum over one rank leaves everything unchanged
    finally:
        dist.destroy_process_group()
    assert ts.count == 3 and ts.sums["L0.mlp_hidden"].tolist() == [2.0] * 8


# ------------------------------------------------------------------------------ update, plan, counts
def _random_scores(gates, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in gates.named_gates()}


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_update_masks_hits_block_targets(pico, budget):
    gates = Gates(pico, tie_qkv=True)
    try:
        spec = gates.spec
        kr = torch.linspace(0.2, 1.0, 24, dtype=torch.float64)
        update_masks(gates, _random_scores(gates), kr, 0.1, P3BConfig(budget=budget))
        kept = kept_cost(gates, spec, budget)
        for b in range(24):
            dims = BlockDims(spec, b)
            dense = dense_block_cost(dims, budget)
            counts = {n: int((getattr(gates.layers[b // 2], n) >= 0.5).sum()) for n in dims.gates}
            one = max(block_cost(dims, {k: v + 1 for k, v in counts.items()}, budget).values())
            assert abs(float(kept[b]) - dense * float(kr[b])) <= one / 2 + 1e-6
        assert all(float(l.attn_heads.detach().min()) == 1.0 for l in gates.layers)  # heads never pruned
    finally:
        gates.remove()


def test_plan_from_gates_counts_and_removed_branch(pico):
    gates = Gates(pico, tie_qkv=True)
    try:
        spec, other = gates.spec, nonblock_params(pico)
        kr = torch.full((24,), 0.5, dtype=torch.float64)
        kr[3] = 1e-6  # mlp1: near-zero keep ratio -> a gate empties -> branch removed
        update_masks(gates, _random_scores(gates, 1), kr, 0.0, P3BConfig(prune_residual=True))
        hard = {n: p.detach().clone() for n, p in gates.named_gates()}
        assert float(gates.layers[1].mlp_hidden.detach().sum()) == 0
        plan = plan_from_gates(gates, spec, {"method": "p3b"}, params_other=other)
        assert plan.layers[1].mlp.removed and not plan.layers[0].mlp.removed
        assert plan.meta == {"method": "p3b"}
        L = plan.layers[0]
        assert L.attn.qk == L.attn.v and L.attn.heads is None
        assert L.attn.in_ == torch.nonzero(gates.layers[0].attn_in >= 0.5).flatten().tolist()
        assert len(L.mlp.hidden) == int((gates.layers[0].mlp_hidden >= 0.5).sum())
        # counts: plan == kept_cost + non-block, for params and MACs; and close to the goal (1 element/block)
        assert plan.params["kept"] == int(kept_cost(gates, spec).sum()) + other
        assert plan.macs["kept"] == int(kept_cost(gates, spec, "macs").sum()) + nonblock_macs(spec)
        assert plan.params["dense"] == sum(p.numel() for p in pico.parameters())
        dense_blocks = torch.tensor(count(spec, other).params_blocks, dtype=torch.float64)
        goal = float((dense_blocks * kr).sum())
        assert abs(plan.params["kept"] - other - goal) < 24 * 1161
        assert plan.keep_ratio[3] == 0.0 and plan.keep_ratio[0] == pytest.approx(0.5, abs=0.01)
        Plan.from_dict(plan.to_dict())  # valid
        # hard masks written by update_masks == masks the plan implies (gates.set_plan)
        gates.set_plan(plan)
        for n, p in gates.named_gates():
            assert torch.equal(p.detach(), hard[n]), n
        with pytest.raises(ValueError, match="params_other"):
            plan_from_gates(gates, spec)
        assert plan_from_gates(gates, spec, {"params_other": other}).params == plan.params
    finally:
        gates.remove()


def test_removed_branch_is_identity_in_the_gated_model():
    model = tiny(depth=1, D=8, heads=2).eval()
    gates = Gates(model, tie_qkv=True)
    kr = torch.tensor([1.0, 1e-9], dtype=torch.float64)  # keep attention, remove the MLP
    update_masks(gates, {}, kr, 0.0, P3BConfig(prune_residual=True))
    x = torch.randn(2, 1, 8, 8)
    blk = model.blocks[0]
    seen = {}
    h = blk.register_forward_hook(lambda _m, i, o: seen.update(i=i[0], o=o))
    h2 = blk.norm2.register_forward_hook(lambda _m, i, o: seen.update(mid=i[0]))
    with torch.no_grad():
        model(x)
    h.remove(), h2.remove()
    assert torch.equal(seen["o"], seen["mid"])  # mlp branch adds exactly zero
    assert not torch.equal(seen["mid"], seen["i"])  # attention still works


def _all_reduce_worker(rank, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ts = TaylorScores(Gates(tiny(), tie_qkv=True))
    ts.sums["L1.attn_qk"].fill_(rank + 1.0)  # rank 0: 1, rank 1: 2 -> sum 3
    ts.count = 10 * (rank + 1)  # 10 + 20 = 30
    ts.all_reduce()
    torch.save({"qk": ts.sums["L1.attn_qk"].clone(), "hid": ts.sums["L0.mlp_hidden"].clone(),
                "count": torch.tensor(ts.count)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_taylor_all_reduce_two_processes(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, tmp_path / "store", tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        d = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert d["qk"].tolist() == [3.0] * 4 and d["hid"].tolist() == [0.0] * 8 and int(d["count"]) == 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_masks_and_plan_on_cuda():
    model = tiny(depth=2, D=8, heads=2).cuda()
    gates = Gates(model, tie_qkv=True)
    ts = TaylorScores(gates)
    x, y = torch.randn(4, 1, 8, 8, device="cuda"), torch.randint(0, 3, (4,), device="cuda")
    F.cross_entropy(model(x), y).backward()
    assert ts.accumulate() and ts.flat.is_cuda
    kr = torch.tensor([0.5, 1e-9, 1.0, 0.5], dtype=torch.float64)
    update_masks(gates, ts.mean(), kr, 0.0, P3BConfig(prune_residual=True))
    assert gates.layers[0].mlp_hidden.is_cuda and float(gates.layers[0].mlp_hidden.detach().sum()) == 0
    plan = plan_from_gates(gates, gates.spec, params_other=nonblock_params(model))
    assert plan.layers[0].mlp.removed and plan.params["kept"] == int(kept_cost(gates).sum()) + nonblock_params(model)
