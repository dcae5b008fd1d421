"""slim --preview: a P3B-shaped slim dir without training, at the requested parameter reduction."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from p3b_deploy import describe, load_slim
from p3b_deploy.cli import main as cli
from p3b_deploy.models.vit import nonblock_params
from p3b_deploy.surgery.preview import preview_plan

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["vit_pico_patch4_32", "deit_small_patch16_224"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_preview_plan_hits_the_ratio_and_is_p3b_shaped(name: str, ratio: float) -> None:
    with torch.device("meta"):  # structure only
        dense = timm.create_model(name)
    spec, other = describe(dense), nonblock_params(dense)
    plan = preview_plan(spec, other, ratio, seed=3)
    full = plan.dense(spec).counts(spec, other).params
    kept = plan.counts(spec, other).params
    assert abs(kept / full - (1 - ratio)) < 0.005
    keep = plan.realised_keep_ratio(spec, other)
    assert max(keep) - min(keep) > 0.2  # non-uniform per block, like P3B
    assert any(L.attn.in_ is not None or L.mlp.out is not None for L in plan.layers)  # residual dims cut
    assert plan.meta["method"] == "preview" and plan.meta["prune_ratio"] == ratio
    again = preview_plan(spec, other, ratio, seed=3)
    assert again.to_dict() == plan.to_dict()  # deterministic
    bneck = preview_plan(spec, other, ratio, seed=3, residual=False)
    assert all(L.attn.in_ is None and L.attn.out is None and L.mlp.in_ is None and L.mlp.out is None
               for L in bneck.layers)


def test_cli_preview_writes_a_loadable_slim_dir(tmp_path, capsys) -> None:
    out = tmp_path / "pv"
    assert cli(["slim", "--preview", "vit_pico_patch4_32", "--prune-ratio", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "for sizing only" in text and f"wrote {out}" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["params"]["slim"] / cfg["params"]["dense"] == pytest.approx(0.5, abs=0.01)
    assert cfg["plan"]["meta"]["method"] == "preview"
    model = load_slim(out)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert cli(["slim", "--preview", "vit_pico_patch4_32", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert cli(["slim", "--preview", "vit_pico_patch4_32", "--prune-ratio", "1.5", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: give either RUN_DIR or --preview MODEL",
                   "error: prune ratio must be in (0, 1), got 1.5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pv"]
