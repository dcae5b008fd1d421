"""Plan contract: JSON round trip, validation errors, exact counts."""
import json

import pytest

from p3b_deploy.errors import PlanError
from p3b_deploy.plan import Plan
from p3b_deploy.models.vit import describe, load_model, nonblock_params


@pytest.fixture(scope="module")
def pico():
    m = load_model("vit_pico_patch4_32")
    return m, describe(m)


def _plan(spec):
    p = Plan.dense(spec)
    p.layers[0].mlp.hidden = [1, 5, 9]
    p.layers[0].attn.qk = [0, 1]
    p.layers[0].attn.v = [3]
    p.layers[0].attn.heads = [2]
    p.layers[1].attn.removed = True
    p.layers[2].mlp.in_ = list(range(0, 96, 2))
    p.layers[2].mlp.out = [7]
    return p


def test_round_trip_and_counts(pico, tmp_path):
    m, s = pico
    p = _plan(s).with_counts(s, nonblock_params(m))
    p.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["format"] == "p3b-plan" and d["version"] == 1 and len(d["layers"]) == 12
    assert d["layers"][0]["attn"]["qk"] == [0, 1] and d["layers"][1]["attn"]["removed"] is True
    q = Plan.load(tmp_path / "plan.json")
    assert q.to_dict() == p.to_dict()
    # hand count of the changed blocks (D=96, heads 3, hd 32, hidden 384, biases everywhere)
    D = 96
    dense_attn = 2 * D + D * 3 * D + 3 * D + D * D + D
    dense_mlp = 2 * D + D * 384 + 384 + 384 * D + D
    attn0 = 2 * D + D * (1 * (2 * 2 + 1)) + 5 + 1 * 1 * D + D  # 1 head, qk 2, v 1
    mlp0 = 2 * D + D * 3 + 3 + 3 * D + D
    mlp2 = 2 * D + 48 * 384 + 384 + 384 * 1 + 1
    removed = (dense_attn - attn0) + (dense_mlp - mlp0) + dense_attn + (dense_mlp - mlp2)
    assert p.params["dense"] - p.params["kept"] == removed
    assert p.params["dense"] == sum(x.numel() for x in m.parameters())
    kr = p.keep_ratio
    assert kr[2] == 0.0 and kr[1] == pytest.approx(mlp0 / dense_mlp) and kr[3] == 1.0


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(format="x"), "not a p3b plan"),
    (lambda d: d.update(version=9), "unsupported plan version"),
    (lambda d: d["layers"][0]["mlp"].update(hidden=[3, 1]), "sorted and unique"),
    (lambda d: d["layers"][0]["mlp"].update(hidden=[1, 1]), "sorted and unique"),
    (lambda d: d["layers"][0]["mlp"].update(hidden=[0, 384]), "outside"),
    (lambda d: d["layers"][0]["attn"].update(qk=[]), "empty in a live branch"),
    (lambda d: d["layers"][0]["attn"].update(out=[-1, 2]), "outside"),
    (lambda d: d["layers"].pop(), "12"),
    (lambda d: d.update(keep_ratio=[0.5] * 3), "keep_ratio"),
    (lambda d: d.pop("dims"), "missing 'dims'"),
])
def test_validation_errors(pico, edit, msg):
    _, s = pico
    d = _plan(s).to_dict()
    edit(d)
    with pytest.raises(PlanError, match=msg):
        Plan.from_dict(d)


def test_removed_branch_lists_ignored(pico):
    _, s = pico
    d = _plan(s).to_dict()
    d["layers"][1]["attn"]["qk"] = []  # ignored: branch removed
    assert Plan.from_dict(d).layers[1].attn.removed


def test_plan_for_other_model_refused(pico):
    _, s = pico
    other = describe(load_model("deit_tiny_patch16_224", img_size=32))
    with pytest.raises(PlanError, match="made for dims"):
        Plan.dense(s).validate(other)


def test_bad_json_file(tmp_path):
    (tmp_path / "p.json").write_text("{nope")
    with pytest.raises(Exception, match="not valid JSON"):
        Plan.load(tmp_path / "p.json")
