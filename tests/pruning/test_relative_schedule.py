"""The schedule is relative to the run by default: `prune --epochs N --prune-ratio R` reaches R."""
from __future__ import annotations

import pytest

from p3b_deploy.cli import main as cli
from p3b_deploy.errors import P3BError
from p3b_deploy.pruning.config import PRESETS, P3BConfig


def test_schedule_fractions_and_absolute_epochs():
    assert P3BConfig(epochs=8).schedule() == (2.0, 4.0, 6.0)
    assert P3BConfig(epochs=1).schedule() == (0.25, 0.5, 0.75)
    assert P3BConfig(epochs=10, start_epoch=1, sparse_frac=0.6).schedule() == (1.0, 6.0, 7.5)
    paper = P3BConfig.preset("paper")
    assert paper.schedule() == (5.0, 25.0, 50.0) and paper.probe == "reference" and paper.prune_residual
    assert P3BConfig.preset("paper", epochs=60).schedule() == (5.0, 25.0, 50.0)
    assert set(PRESETS) == {"paper"}


@pytest.mark.parametrize("kw, msg", [
    (dict(epochs=8, start_epoch=5, sparse_epoch=25, final_epoch=50), "ends at epoch 50 .* the run has 8 epochs"),
    (dict(epochs=8, start_frac=0.6, sparse_frac=0.5), "fractions must satisfy"),
    (dict(epochs=8, start_epoch=3, sparse_epoch=2), "prune-start <= prune-sparse"),
    (dict(epochs=8, final_frac=1.5), "fractions must satisfy"),
])
def test_schedule_that_cannot_reach_the_target_is_refused(kw, msg):
    with pytest.raises(P3BError, match=msg):
        P3BConfig(**kw)


def test_cli_refuses_the_old_absolute_default_on_a_short_run(tmp_path, capsys):
    """What a new user hit: absolute epochs 5/25/50 with --epochs 8 pruned nothing and exited 0."""
    rc = cli(["prune", "--model", "vit_pico_patch4_32", "--img-size", "16", "--data", "digits", "--epochs", "8",
              "--prune-ratio", "0.7", "--preset", "paper", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "the run has 8 epochs" in err[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 3, 8])
def test_prune_with_only_epochs_and_ratio_reaches_the_ratio(epochs, tmp_path):
    from p3b_deploy.data import build_loaders
    from p3b_deploy.models import load_model
    from p3b_deploy.models.demo import demo_checkpoint_path
    from p3b_deploy.pruning import prune
    model = load_model("vit_nano_patch4_16", checkpoint=demo_checkpoint_path())
    data = build_loaders("digits", model=model, batch_size=64, seed=0)
    res = prune(model, data, P3BConfig(epochs=epochs, prune_ratio=0.7, progress=False), tmp_path / "r")
    kept = res.plan.params["kept"] / res.plan.params["dense"]
    assert abs(kept - 0.3) <= 0.01, kept
