"""`--budget latency`: allocation by hand, agreement with the mask search, geometry refusal, and a
tiny end-to-end prune that lands on its predicted target."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from p3b_deploy.bench.latency_table import LatencyTable, LatencyTableError
from p3b_deploy.cli import main as cli
from p3b_deploy.models.vit import describe, load_model
from p3b_deploy.plan import Plan
from p3b_deploy.pruning.p3b.latency import LatencyCost, latency_keep_ratios, uniform_latency_keep_ratio
from p3b_deploy.pruning.p3b.masks import RESIDUAL_GATES, BlockDims, dense_block_cost, select_block
from tables import toy_table

torch.set_num_threads(1)


class LinearCost:
    """Toy cost: block i costs dense_ms[i] * kr_i (no width steps), fixed part 1 ms."""

    def __init__(self, dense_ms):
        self.d = np.asarray(dense_ms, dtype=float)
        self.spec = SimpleNamespace(num_blocks=len(self.d))

    def total_ms(self, kr):
        return 1.0 + float((self.d * np.asarray(torch.as_tensor(kr), dtype=float)).sum())


def test_allocation_by_hand():
    # imp (1, 2, 4, 1), each block 1 ms dense, fixed 1 ms, target 3 ms: kr = min(1, c imp) with
    # 1 + c + 2c + min(1, 4c) + c = 3 -> block 3 clamps at 1, c = 0.25 -> kr (0.25, 0.5, 1, 0.25)
    kr = latency_keep_ratios([1.0, 2.0, 4.0, 1.0], LinearCost([1, 1, 1, 1]), 3.0)
    assert kr.tolist() == pytest.approx([0.25, 0.5, 1.0, 0.25], abs=1e-3)
    assert LinearCost([1, 1, 1, 1]).total_ms(kr) <= 3.0
    # unequal block costs: (2 ms, 1 ms), imp (1, 1), target 2.5 -> 1 + 3c = 2.5 -> c = 0.5
    assert latency_keep_ratios([1.0, 1.0], LinearCost([2, 1]), 2.5).tolist() == pytest.approx([0.5, 0.5], abs=1e-3)
    # a target at or above dense keeps everything; zero importance everywhere -> uniform
    assert latency_keep_ratios([1.0, 3.0], LinearCost([1, 1]), 5.0).tolist() == [1.0, 1.0]
    assert latency_keep_ratios([0.0, 0.0], LinearCost([1, 1]), 2.0).tolist() == pytest.approx([0.5, 0.5], abs=1e-3)


@pytest.fixture(scope="module")
def pico16():
    return describe(load_model("vit_pico_patch4_32", img_size=16))


def test_cost_widths_match_the_mask_search(pico16):
    """The width the allocation prices is the width select_block keeps for that keep ratio."""
    cost = LatencyCost(toy_table(pico16), pico16)
    rng = np.random.default_rng(0)
    kr = torch.tensor(rng.uniform(0, 1, pico16.num_blocks) ** 2, dtype=torch.float64)
    widths = cost.widths(kr)
    for b in range(pico16.num_blocks):
        dims = BlockDims(pico16, b)
        m = select_block({}, {}, dims, dense_block_cost(dims) * (1 - float(kr[b])), 0.0, "params", RESIDUAL_GATES)
        inner = m["attn_qk" if dims.kind == "attn" else "mlp_hidden"]
        kept = int((inner >= 0.5).sum()) if all(bool((v >= 0.5).any()) for v in m.values()) else 0
        assert kept == widths[b], b


def test_allocation_hits_target_on_the_table(pico16):
    table = toy_table(pico16)
    cost = LatencyCost(table, pico16)
    assert cost.dense_ms == pytest.approx(table.dense_ms) == pytest.approx(0.2 + 12 * (0.37 + 0.788))
    target = table.target_ms("0.5")
    imp = torch.tensor(np.random.default_rng(1).lognormal(0, 0.7, pico16.num_blocks))
    for kr in (latency_keep_ratios(imp, cost, target), uniform_latency_keep_ratio(cost, target)):
        got = cost.total_ms(kr)
        assert got <= target and got >= target - 0.05  # at most one width step (~0.04 ms here) below
    u = uniform_latency_keep_ratio(cost, target)
    assert len(set(u.tolist())) == 1


def test_geometry_mismatch_refused(pico16, tmp_path, capsys):
    nano = describe(load_model("vit_nano_patch4_16"))
    with pytest.raises(LatencyTableError) as e:
        LatencyCost(toy_table(pico16), nano)
    assert str(e.value) == (
        "latency table does not fit the model: it was measured for vit_pico_patch4_32 at 16 px (17 tokens), the "
        "model is vit_nano_patch4_16 at 16 px (17 tokens); structure embed_dim 96 vs 64, num_heads 3 vs 2, "
        "mlp_hidden 384 vs 256 (table vs model); time a pack made for this model "
        "(latency-pack vit_nano_patch4_16 --img-size 16)")
    (tmp_path / "t.json").write_text(json.dumps(toy_table(pico16).to_dict()))
    rc = cli(["prune", "--model", "vit_pico_patch4_32", "--data", "digits", "--epochs", "0.05",
              "--budget", "latency", "--latency-table", str(tmp_path / "t.json"), "--latency-target", "0.5",
              "--out", str(tmp_path / "run")])  # img 32: 65 tokens, the table has 17
    err = capsys.readouterr().err.strip().splitlines()
    # same model, another token count: the message says what differs (size and tokens), no structure diff
    assert rc == 2 and len(err) == 1, err
    assert err[0] == ("error: latency table does not fit the model: it was measured for vit_pico_patch4_32 at 16 px "
                      "(17 tokens), the model is vit_pico_patch4_32 at 32 px (65 tokens); time a pack made for this "
                      "model (latency-pack vit_pico_patch4_32 --img-size 32)")
    assert not (tmp_path / "run" / "plan.json").exists()
    rc = cli(["prune", "--model", "vit_pico_patch4_32", "--data", "digits", "--budget", "latency",
              "--out", str(tmp_path / "run")])
    assert rc == 2 and "needs --latency-table" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["p3b", "uniform"])
def test_prune_end_to_end_hits_predicted_target(pico16, tmp_path, method, capsys):
    table = toy_table(pico16)
    (tmp_path / "t.json").write_text(json.dumps(table.to_dict()))
    run = tmp_path / "run"
    rc = cli(["prune", "--model", "vit_pico_patch4_32", "--img-size", "16", "--data", "digits", "--epochs", "0.2",
              "--method", method, "--budget", "latency", "--latency-table", str(tmp_path / "t.json"),
              "--latency-target", "0.45", "--out", str(run)])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    plan = Plan.load(run / "plan.json")
    lat = plan.meta["latency"]
    target = 0.45 * table.dense_ms
    assert lat["latency_target_ms"] == pytest.approx(target, rel=1e-4)
    assert lat["pred_latency_ms"] == pytest.approx(table.predict(plan), abs=1e-4)
    # the realised plan meets the target and is within 5% of it (width steps of this table ~1.5%)
    assert target * 0.95 <= table.predict(plan) <= target + 1e-9
    ups = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ups = [u for u in ups if u["event"] == "mask_update"]
    assert ups and all("pred_latency_ms" in u for u in ups)
    # the plan summary on the terminal: prediction, target, allocation, table, removed branches
    alloc = "knapsack" if method == "p3b" else "uniform"  # uniform: one keep ratio for every block
    t = f"{tmp_path / 't.json'} (target ort-fp32, CPUExecutionProvider, batch 1, threads 1, None)"
    pred = (f"{lat['pred_latency_ms']:.4g} ms of dense {table.dense_ms:.4g} ms ({lat['pred_speedup']:.2f}x); "
            f"target {target:.4g} ms, {alloc} allocation; table {t}")
    gone = [f"{k}{i}" for i, L in enumerate(plan.layers) for k, b in (("attn", L.attn), ("mlp", L.mlp)) if b.removed]
    assert f"predicted latency: {pred}" in out, out
    assert f"removed branches: {len(gone)} of {2 * len(plan.layers)}" + (f" ({', '.join(gone)})" if gone else "") in out, out
    assert out[1].startswith(f"method {method}, budget latency: params ")
    report = (run / "report.md").read_text().splitlines()
    assert f"- predicted latency: {pred}" in report
    # report.md names the latency target, not the prune ratio this run never read
    assert f"- latency target: 0.45 = {target:.4g} ms on the table (dense {table.dense_ms:.4g} ms)" in report
    assert not any(line.startswith("- prune ratio") for line in report)
