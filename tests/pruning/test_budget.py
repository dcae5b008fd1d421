"""p3b.budget: every formula of the inter-block allocation and the schedule vs hand-computed numbers."""

import pytest
import torch

from p3b_deploy.errors import P3BError
from p3b_deploy.pruning.p3b.budget import (KEPT_FLOOR_FRAC, BudgetState, Schedule, allocate, block_budget,
                                   fixed_keep_ratios, keep_ratios, squash)
from p3b_deploy.pruning.config import P3BConfig

CFG = P3BConfig()  # s=10, beta=1.4, gamma=0.2, alpha=0.5
T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

# softplus(x) = ln(1 + e^x); squash(v) = softplus(1.4 v) - softplus(1.4 v - 10)
SQ_10 = 9.9818509  # v=10: softplus(14)=14.00000083 - softplus(4)=4.01814993
SQ_5 = 6.9523241  # v=5:  softplus(7)=7.00091147 - softplus(-3)=0.04858735
SQ_0 = 0.6931018  # v=0:  ln 2=0.69314718 - softplus(-10)=0.00004540
SQ_M10 = 8.3149e-7  # v=-10: softplus(-14)=8.3153e-7 - softplus(-24)=3.8e-11


# ------------------------------------------------------------------------------ squash
def test_squash_hand_values():
    # delta [2, 1, 0, -2]: max 2 -> v = delta * 10 / 2 = [10, 5, 0, -10]
    out = squash(T(2, 1, 0, -2), 10.0, 1.4)
    assert out.tolist() == pytest.approx([SQ_10, SQ_5, SQ_0, SQ_M10], rel=1e-6, abs=1e-9)


def test_squash_is_scale_invariant_and_bounded():
    a, b = squash(T(0.3, 0.1, -0.5), 10.0), squash(T(3.0, 1.0, -5.0), 10.0)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    big = squash(T(1e6, -1e6), 10.0)  # soft clip to (0, s): max maps to SQ_10, never above 10
    assert 0 < big.min() and big.max() < 10


def test_squash_beta_and_scale_parameters():
    # s=4, beta=1: v = [4, 2] -> softplus(4)-softplus(0) = 4.01815-0.69315 = 3.32500;
    #                          softplus(2)-softplus(-2) = 2.12693-0.12693 = 2.00000
    assert squash(T(2, 1), 4.0, 1.0).tolist() == pytest.approx([3.3250027, 2.0], rel=1e-6)


def test_squash_without_positive_benefit_treats_blocks_equal():
    # max(delta) <= 0: no block helps -> every block gets squash(s), i.e. equal importance
    for delta in (T(-1, -2, -0.5), T(0, 0, 0)):
        assert squash(delta, 10.0).tolist() == pytest.approx([SQ_10] * 3, rel=1e-6)


def test_squash_non_finite_entries_count_as_zero():
    # [2, nan, inf] -> [2, 0, 0] -> v = [10, 0, 0]
    assert squash(T(2, float("nan"), float("inf")), 10.0).tolist() == pytest.approx([SQ_10, SQ_0, SQ_0], rel=1e-6)


# ------------------------------------------------------------------------------ allocation
def test_allocate_hand_computed_no_clamp():
    # Equal benefit everywhere -> squash equal; dense = kept = [100, 200, 100, 200], other 50, R 0.5.
    # v / kept ∝ [1/100, 1/200, 1/100, 1/200]; mean 0.0075 -> imp = [4/3, 2/3, 4/3, 2/3].
    # block budget = 0.5 * (600 + 50) - 50 = 275; sum imp * dense = 4 * 133.33 = 533.33 -> c = 0.515625
    # kr = [0.6875, 0.34375, 0.6875, 0.34375]
    d = T(100, 200, 100, 200)
    kr, imp, st = allocate(T(1, 1, 1, 1), T(3, 3, 3, 3), d, d, 50, 0.5, BudgetState(), CFG)
    assert imp.tolist() == pytest.approx([4 / 3, 2 / 3, 4 / 3, 2 / 3], rel=1e-12)
    assert kr.tolist() == pytest.approx([0.6875, 0.34375, 0.6875, 0.34375], rel=1e-12)
    assert st.v_cls.tolist() == pytest.approx(imp.tolist()) and st.v_patch.tolist() == pytest.approx(imp.tolist())


def test_allocate_clamps_a_block_to_one_and_rescales_the_rest():
    # kept = [25, 200, 100, 200] (dense [100, 200, 100, 200]), equal benefit:
    # v ∝ [1/25, 1/200, 1/100, 1/200] = [.04, .005, .01, .005]; mean .015 -> imp [8/3, 1/3, 2/3, 1/3]
    # round 1: c = 275 / (266.67 + 66.67 + 66.67 + 66.67) = 0.5893 -> kr0 = 1.571 > 1 -> clamp to 1
    # round 2: left 275 - 100 = 175 over 200 (= 66.67 * 3) -> c = 0.875 -> [1, 0.29167, 0.58333, 0.29167]
    kr, imp, _ = allocate(T(1, 1, 1, 1), None, T(25, 200, 100, 200), T(100, 200, 100, 200), 50, 0.5, BudgetState(), CFG)
    assert imp.tolist() == pytest.approx([8 / 3, 1 / 3, 2 / 3, 1 / 3], rel=1e-12)
    assert kr.tolist() == pytest.approx([1.0, 0.875 / 3, 0.875 * 2 / 3, 0.875 / 3], rel=1e-12)


def test_keep_ratios_cascading_clamp():
    # imp [10, 3, 1, 1], dense 100 each, budget 300:
    # c = 300/1500 = .2 -> [2, .6, .2, .2]: clamp 0; c = 200/500 = .4 -> [1, 1.2, .4, .4]: clamp 1;
    # c = 100/200 = .5 -> [1, 1, .5, .5]
    kr = keep_ratios(T(10, 3, 1, 1), T(100, 100, 100, 100), 300.0)
    assert kr.tolist() == pytest.approx([1, 1, 0.5, 0.5], rel=1e-12)
    assert keep_ratios(T(1, 2), T(10, 10), 25.0).tolist() == [1.0, 1.0]  # budget above dense: all kept
    assert keep_ratios(T(0, 0), T(10, 30), 20.0).tolist() == [0.5, 0.5]  # zero importance: uniform


def test_allocate_near_zero_keep_ratio_for_a_harmful_block():
    # delta [1, 1, -1] -> v = [10, 10, -10] -> squash [SQ_10, SQ_10, SQ_M10]; kept = dense = 100
    # imp ∝ [1, 1, 8.33e-8]; budget (R 0.6, other 0) = 0.4 * 300 = 120 = c * 100 * (2 + 8.33e-8)
    # -> kr ≈ [0.6, 0.6, 0.6 * 8.33e-8]
    d = T(100, 100, 100)
    kr, _, _ = allocate(T(1, 1, -1), None, d, d, 0, 0.6, BudgetState(), CFG)
    assert kr[:2].tolist() == pytest.approx([0.6, 0.6], rel=1e-7)
    assert kr[2].item() == pytest.approx(0.6 * SQ_M10 / SQ_10, rel=1e-3) and kr[2] < 1e-7


def test_alpha_mixing():
    # dense = kept = 100 for both blocks. cls delta [1, 1] -> v_cls = [1, 1].
    # patch delta [1, 0] -> [SQ_10, SQ_0]; mean 5.3374765 -> v_patch = [1.8701442, 0.1298558]
    # alpha 0.5: imp = [1.4350721, 0.5649279]; alpha 0.8: 0.8 + 0.2 * v_patch = [1.1740288, 0.8259712]
    d = T(100, 100)
    vp = [SQ_10 / ((SQ_10 + SQ_0) / 2), SQ_0 / ((SQ_10 + SQ_0) / 2)]
    assert vp == pytest.approx([1.8701442, 0.1298558], rel=1e-6)
    _, imp, st = allocate(T(1, 1), T(1, 0), d, d, 0, 0.5, BudgetState(), CFG)
    assert imp.tolist() == pytest.approx([1.4350721, 0.5649279], rel=1e-6)
    assert st.v_cls.tolist() == pytest.approx([1, 1]) and st.v_patch.tolist() == pytest.approx(vp, rel=1e-6)
    _, imp8, _ = allocate(T(1, 1), T(1, 0), d, d, 0, 0.5, BudgetState(), CFG.replace(alpha=0.8))
    assert imp8.tolist() == pytest.approx([1.1740288, 0.8259712], rel=1e-6)
    _, imp_cls_only, _ = allocate(T(1, 1), None, d, d, 0, 0.5, BudgetState(), CFG)
    assert imp_cls_only.tolist() == [1.0, 1.0]


def test_smoothing_with_previous_state():
    # new v_cls = [1, 1] (equal benefit, equal kept); previous [2, 0]:
    # gamma 0.2: 0.2 * [1, 1] + 0.8 * [2, 0] = [1.8, 0.2]. Same for patch with previous [0.5, 1.5]:
    # 0.2 + 0.8 * [0.5, 1.5] = [0.6, 1.4]; imp = 0.5 * ([1.8, .2] + [.6, 1.4]) = [1.2, 0.8]
    d = T(100, 100)
    prev = BudgetState(v_cls=T(2, 0), v_patch=T(0.5, 1.5))
    kr, imp, st = allocate(T(1, 1), T(5, 5), d, d, 0, 0.5, prev, CFG)
    assert st.v_cls.tolist() == pytest.approx([1.8, 0.2]) and st.v_patch.tolist() == pytest.approx([0.6, 1.4])
    assert imp.tolist() == pytest.approx([1.2, 0.8])
    # budget 100 of 200: c = 100 / (120 + 80) = 0.5 -> kr = [0.6, 0.4]
    assert kr.tolist() == pytest.approx([0.6, 0.4])


def test_budget_equation_holds_exactly_after_clamping():
    g = torch.Generator().manual_seed(0)
    clamped = 0
    for trial in range(50):
        n = 24
        dense = torch.randint(1_000, 200_000, (n,), generator=g).double()
        kept = dense * torch.rand(n, generator=g, dtype=torch.float64)
        R, other = 0.2 + 0.6 * torch.rand(1, generator=g).item(), 50_000.0
        st = BudgetState(v_cls=torch.rand(n, generator=g, dtype=torch.float64) * 2, v_patch=None)
        kr, _, _ = allocate(torch.randn(n, generator=g), torch.randn(n, generator=g), kept, dense, other, R, st, CFG)
        total = float(dense.sum()) + other
        assert float((kr * dense).sum()) + other == pytest.approx((1 - R) * total, rel=1e-12)
        assert kr.min() >= 0 and kr.max() <= 1
        clamped += int((kr == 1).sum() > 0)
    assert clamped > 5  # the random cases do exercise the clamp


def test_removed_branch_kept_cost_is_floored():
    # kept [0, 100], dense [100, 100], equal benefit: kept_eff = [0.01 * 100, 100] = [1, 100]
    # imp ∝ [1, 1/100] -> kr ∝ [100, 1]; budget 100 -> kr = [100/101, 1/101]
    assert KEPT_FLOOR_FRAC == 0.01
    kr, imp, _ = allocate(T(1, 1), None, T(0, 100), T(100, 100), 0, 0.5, BudgetState(), CFG)
    assert torch.isfinite(imp).all()
    assert kr.tolist() == pytest.approx([100 / 101, 1 / 101], rel=1e-12)


def test_allocate_robust_inputs():
    d = T(100, 300)
    # all-NaN benefit -> equal benefit -> imp ∝ 1/kept = [3/2, 1/2]; budget 200 -> c = 200/300 -> kr [1, 1/3]
    kr, _, _ = allocate(T(float("nan"), float("nan")), None, d, d, 0, 0.5, BudgetState(), CFG)
    assert kr.tolist() == pytest.approx([1.0, 1 / 3])
    kr0, _, _ = allocate(T(1, 2), None, d, d, 0, 0.0, BudgetState(), CFG)
    assert kr0.tolist() == [1.0, 1.0]  # R 0: everything kept
    with pytest.raises(P3BError, match="no budget"):
        allocate(T(1, 2), None, d, d, 1000, 0.8, BudgetState(), CFG)  # other = 1000 > 0.2 * 1400
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(P3BError, match="prune ratio"):
            block_budget(d, 0, bad)
    with pytest.raises(ValueError, match="entries"):
        allocate(T(1, 2, 3), None, d, d, 0, 0.5, BudgetState(), CFG)


def test_budget_state_round_trip():
    st = BudgetState(v_cls=T(1, 2), v_patch=None)
    d = st.state_dict()
    assert set(d) == {"v_cls"}
    back = BudgetState.from_state_dict(d)
    assert back.v_cls.tolist() == [1, 2] and back.v_patch is None


def test_reactivation_block_regains_keep_ratio():
    # Block 0 hurts for three updates (delta -1), then helps most (delta 2); masks follow the goal
    # (kept = kr * dense). It starts near 0 and regains budget update after update (smoothing makes
    # it gradual), ending above the blocks that helped all along.
    d = T(100, 100, 100, 100)
    st, kept, hist = BudgetState(), d.clone(), []
    for delta in [T(-1, 1, 1, 1)] * 3 + [T(2, 1, 1, 1)] * 8:
        kr, _, st = allocate(delta, delta, kept, d, 0, 0.5, st, CFG)
        kept = kr * d
        hist.append(kr[0].item())
    assert max(hist[:3]) < 1e-5  # pruned away (branch removed by the masks)
    assert all(b > a for a, b in zip(hist[3:], hist[4:]))  # regains budget at every update
    assert hist[3] > 0.3 and hist[-1] > 0.55 and hist[-1] > kr[1].item()
    assert hist[3] < hist[-1] - 0.1  # gradual: smoothing with the past low importance


# ------------------------------------------------------------------------------ fixed ratios
def test_fixed_keep_ratios():
    d = T(100, 200, 100, 200)
    # uniform: block budget 0.5 * 650 - 50 = 275 -> 275 / 600 = 0.4583333 for every block
    for spec in (None, "uniform"):
        assert fixed_keep_ratios(spec, d, 50, 0.5).tolist() == pytest.approx([275 / 600] * 4, rel=1e-12)
    assert fixed_keep_ratios(0.3, d, 50, 0.5).tolist() == pytest.approx([0.3] * 4)
    assert fixed_keep_ratios([1, 0.5, 0, 0.25], d, 50, 0.5).tolist() == [1, 0.5, 0, 0.25]
    for bad, msg in (([0.5] * 3, "expected 4"), ([0.5, 0.5, 1.5, 0.5], r"\[0, 1\]"), (float("nan"), r"\[0, 1\]"),
                     (["a", 1, 1, 1], "numbers"), ("half", "must be")):
        with pytest.raises(P3BError, match=msg):
            fixed_keep_ratios(bad, d, 50, 0.5)


# ------------------------------------------------------------------------------ schedule
def test_schedule_phases_progress_and_ramp():
    s = Schedule(start=10, sparse=30, final=50, update_every=5)
    assert [s.phase(k) for k in (0, 9, 10, 29, 30, 49, 50, 99)] == [
        "warmup", "warmup", "sparsify", "sparsify", "sharpen", "sharpen", "frozen", "frozen"]
    # progress = (step - 10) / 20 clipped
    assert [s.progress(k) for k in (0, 10, 15, 20, 25, 30, 45)] == [0, 0, 0.25, 0.5, 0.75, 1, 1]
    # applied at step 20: 1 - (1 - [0.2, 0.6, 1]) * 0.5 = [0.6, 0.8, 1.0]
    assert s.applied(T(0.2, 0.6, 1.0), 20).tolist() == pytest.approx([0.6, 0.8, 1.0])
    assert s.applied(T(0.2, 0.6), 10).tolist() == [1.0, 1.0]
    assert s.applied(T(0.2, 0.6), 40).tolist() == pytest.approx([0.2, 0.6])


def test_schedule_tau_annealing():
    s = Schedule(start=10, sparse=30, final=50, update_every=5, tau_max=0.1, tau_min=0.0)
    # tau_max through sparsify, then linear: 0.1 * (1 - (step - 30) / 20)
    assert [s.tau(k) for k in (0, 20, 30, 40, 45, 50, 80)] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.025, 0.0, 0.0])
    s2 = Schedule(10, 30, 50, 5, tau_max=0.1, tau_min=0.02)
    assert s2.tau(40) == pytest.approx(0.06) and s2.tau(50) == pytest.approx(0.02)


def test_schedule_updates():
    s = Schedule(start=10, sparse=30, final=50, update_every=5)
    assert [k for k in range(70) if s.is_update(k)] == [10, 15, 20, 25, 30, 35, 40, 45, 50]
    s = Schedule(start=10, sparse=30, final=50, update_every=7)  # final off the grid still updates
    assert [k for k in range(70) if s.is_update(k)] == [10, 17, 24, 31, 38, 45, 50]
    z = Schedule(start=5, sparse=5, final=5, update_every=3)  # degenerate: jump straight to the goal
    assert z.progress(5) == 1.0 and z.tau(5) == 0.0 and [k for k in range(9) if z.is_update(k)] == [5]


def test_schedule_from_epochs():
    s = Schedule.from_epochs(5, 25, 50, steps_per_epoch=10)
    assert (s.start, s.sparse, s.final, s.update_every) == (50, 250, 500, 3)  # ~3 updates per epoch
    s = Schedule.from_epochs(0.5, 1.25, 2, steps_per_epoch=100, update_every=7, tau_max=0.2)
    assert (s.start, s.sparse, s.final, s.update_every, s.tau_max) == (50, 125, 200, 7, 0.2)
    assert Schedule.from_epochs(0, 1, 1, steps_per_epoch=1).update_every == 1
    with pytest.raises(P3BError, match="start <= sparse"):
        Schedule(10, 5, 20, 1)
    with pytest.raises(P3BError, match="update_every"):
        Schedule(1, 2, 3, 0)
    with pytest.raises(P3BError, match="tau"):
        Schedule(1, 2, 3, 1, tau_max=0.1, tau_min=0.2)
