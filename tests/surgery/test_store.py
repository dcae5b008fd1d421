"""Slim dirs: save/load round trip without pickle, clear errors, run-dir surgery, slim/inspect CLIs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from plans import random_plan, randomize_
from p3b_deploy import __version__, describe, load_slim, save_slim, slim
from p3b_deploy.cli import main as cli
from p3b_deploy.errors import CheckpointError, P3BError, SurgeryError
from p3b_deploy.surgery.store import inspect_source
from p3b_deploy.surgery.core import SlimMlp, slim_run_dir

torch.set_num_threads(1)


def _pico(depth: int = 4, seed: int = 0):
    return randomize_(timm.create_model("vit_pico_patch4_32", depth=depth), seed=seed).eval()


def _x(model, seed: int = 3) -> torch.Tensor:
    pe = model.patch_embed  # works for dense and slim models alike
    return torch.randn(2, pe.proj.in_channels, *pe.img_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(slim model, slim dir) for a pico model with a random plan."""
    dense = _pico()
    small = slim(dense, random_plan(describe(dense), seed=4, remove_prob=0.25))
    out = tmp_path_factory.mktemp("slim") / "pico"
    save_slim(small, out)
    return small, out


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip_identical(saved) -> None:
    small, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = load_slim(out)
    x = _x(small)
    with torch.no_grad():
        assert torch.equal(again(x), small.eval()(x))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
    assert again.p3b_slim_config.plan == small.p3b_slim_config.plan


_NO_TP = r"""
import sys
sys.modules["torch_pruning"] = None  # any torch_pruning import now raises ImportError
import torch
from p3b_deploy import load_slim
m = load_slim(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(m(x), sys.argv[3])
print("TP", sys.modules.get("torch_pruning"))
"""


def test_load_slim_needs_no_torch_pruning(saved, tmp_path) -> None:
    """Inference from a slim dir: torch + timm + this package; Torch-Pruning is only for cutting."""
    import os
    import subprocess
    import sys
    small, out = saved
    x = _x(small, seed=8)
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, "-c", _NO_TP, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "TP None"  # still blocked: nothing imported it
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), small.eval()(x))


def test_config_contents(saved) -> None:
    small, out = saved
    cfg = json.loads((out / "config.json").read_text())
    plan = small.p3b_slim_config.get_plan()
    assert cfg["format"] == "p3b-slim" and cfg["version"] == 1 and cfg["tool_version"] == __version__
    assert cfg["model"] == "vit_pico_patch4_32" and cfg["num_classes"] == 10
    assert cfg["model_kwargs"] == {"img_size": 32, "patch_size": 4, "num_classes": 10, "in_chans": 3, "depth": 4}
    pre = cfg["preprocessing"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
    assert pre["interpolation"] == "bilinear" and pre["crop_pct"] == 1.0
    assert cfg["scales"] == [32 ** -0.5] * 4
    assert cfg["params"]["slim"] == sum(p.numel() for p in small.parameters())
    assert cfg["macs"]["slim"] < cfg["macs"]["dense"] and cfg["verified_max_abs_diff"] < 1e-4
    for i, L in enumerate(plan.layers):
        a, m = cfg["blocks"][2 * i], cfg["blocks"][2 * i + 1]
        assert a["removed"] == L.attn.removed and m["removed"] == L.mlp.removed
        assert cfg["residual_io"][2 * i] == ("removed" if L.attn.removed else "index")
        if not L.mlp.removed:
            assert m["hidden_idx"] == L.mlp.hidden and m["out_idx"] == L.mlp.out
            assert m["hidden"] == (384 if L.mlp.hidden is None else len(L.mlp.hidden))
    assert any(b["removed"] for b in cfg["blocks"])


@pytest.mark.parametrize("name,io", [("deit3_small_patch16_224", "dense"),
                                     ("deit_tiny_distilled_patch16_224", "index")])
def test_round_trip_other_models(tmp_path, name: str, io: str) -> None:
    dense = randomize_(timm.create_model(name, img_size=32, depth=3), seed=1).eval()
    small = slim(dense, random_plan(describe(dense), seed=2), residual_io=io)
    save_slim(small, tmp_path / "s")
    again = load_slim(tmp_path / "s")
    x = _x(dense)
    with torch.no_grad():
        assert torch.equal(again(x), small.eval()(x))
    assert again.pretrained_cfg["input_size"] == (3, 32, 32)
    assert again.pretrained_cfg["mean"] == dense.pretrained_cfg["mean"]


def test_save_refuses_dense_model(tmp_path) -> None:
    with pytest.raises(SurgeryError, match="not a slim model"):
        save_slim(_pico(depth=1), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _live_mlp(cfg) -> int:
    return next(i for i, L in enumerate(cfg["plan"]["layers"]) if not L["mlp"]["removed"]
                and L["mlp"]["hidden"] and L["mlp"]["in"])


def test_load_errors(saved, tmp_path) -> None:
    _, out = saved
    with pytest.raises(CheckpointError, match="not found"):
        load_slim(tmp_path / "nope")
    d = _copy_dir(out, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights not found"):
        load_slim(d)
    d = _copy_dir(out, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_slim(d)
    d = _copy_dir(out, tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_slim(d)
    d = _copy_dir(out, tmp_path / "format")
    _edit_config(d, lambda c: c.update(format="something"))
    with pytest.raises(CheckpointError, match="not a p3b slim config"):
        load_slim(d)


def test_config_disagreeing_with_weights(saved, tmp_path) -> None:
    _, out = saved
    cfg0 = json.loads((out / "config.json").read_text())
    i = _live_mlp(cfg0)

    def fewer_hidden(c):  # a shape the weights do not have
        c["plan"]["layers"][i]["mlp"]["hidden"] = c["plan"]["layers"][i]["mlp"]["hidden"][:-1]
    d = _copy_dir(out, tmp_path / "shape")
    _edit_config(d, fewer_hidden)
    with pytest.raises(CheckpointError, match="shape"):
        load_slim(d)

    def out_of_range(c):
        c["plan"]["layers"][i]["mlp"]["in"][-1] = 10_000
        c["blocks"][2 * i + 1]["in_idx"][-1] = 10_000
    d = _copy_dir(out, tmp_path / "range")
    _edit_config(d, out_of_range)
    with pytest.raises(CheckpointError, match="outside"):
        load_slim(d)

    def other_indices(c):  # same count, different dims: the weights' index buffers disagree
        n = len(c["plan"]["layers"][i]["mlp"]["in"])
        new = [j for j in range(96) if j not in c["plan"]["layers"][i]["mlp"]["in"]][:n]
        new = sorted(new + [j for j in range(96) if j not in new][: n - len(new)])
        c["plan"]["layers"][i]["mlp"]["in"] = new
        c["blocks"][2 * i + 1]["in_idx"] = new
    d = _copy_dir(out, tmp_path / "idx")
    _edit_config(d, other_indices)
    with pytest.raises(CheckpointError, match="indices"):
        load_slim(d)

    def blocks_disagree(c):
        c["blocks"][2 * i + 1]["removed"] = True
    d = _copy_dir(out, tmp_path / "blocks")
    _edit_config(d, blocks_disagree)
    with pytest.raises(CheckpointError, match="disagrees"):
        load_slim(d)


# ------------------------------------------------------------------ run dir + CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A `prune`-style run dir: dense weights + plan.json with meta.model_kwargs."""
    dense = randomize_(timm.create_model("vit_pico_patch4_32"), seed=5).eval()
    plan = random_plan(describe(dense), seed=6, remove_prob=0.2)
    plan.meta["model_kwargs"] = {"img_size": 32, "patch_size": 4, "num_classes": 10}
    d = tmp_path_factory.mktemp("run")
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(d / "model.safetensors"))
    plan.save(d / "plan.json")
    return d


def test_slim_run_dir(run_dir) -> None:
    small = slim_run_dir(run_dir, round_to=8)
    cfg = small.p3b_slim_config
    assert cfg.verified_max_abs_diff < 1e-4 and cfg.round_to == 8
    assert all(b.mlp.fc1.out_features % 8 == 0 for b in small.blocks if isinstance(b.mlp, SlimMlp))
    with pytest.raises(P3BError, match="not found"):
        slim_run_dir(run_dir / "missing")


def test_cli_slim_and_inspect(run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "slim"
    assert cli(["slim", str(run_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert f"{cfg['params']['dense']:,} -> slim {cfg['params']['slim']:,}" in text
    assert f"{cfg['macs']['slim']:,}" in text and "attn11" in text and "removed" in text
    again = load_slim(out)
    assert sum(p.numel() for p in again.parameters()) == cfg["params"]["slim"]
    for src, kind in ((run_dir / "plan.json", "plan"), (run_dir, "run dir"), (out, "slim dir")):
        assert cli(["inspect", str(src)]) == 0
        text = capsys.readouterr().out
        assert text.startswith(kind) and f"kept {cfg['params']['slim']:,}" in text
        assert len([ln for ln in text.splitlines() if ln.strip().startswith(("attn", "mlp"))]) == 24
    info = inspect_source(out)
    assert [r["removed"] for r in info["rows"]] == [b["removed"] for b in cfg["blocks"]]


def test_cli_errors(run_dir, tmp_path, capsys) -> None:
    assert cli(["slim", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) != 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "plan.json").write_text('{"format": "p3b-plan", "version": 1, "model": ')
    (bad / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    assert cli(["slim", str(bad), "--out", str(tmp_path / "o")]) != 0
    assert cli(["inspect", str(bad)]) != 0
    assert cli(["inspect", str(tmp_path / "nope")]) != 0
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "plan.json").write_text((run_dir / "plan.json").read_text())
    assert cli(["slim", str(noweights), "--out", str(tmp_path / "o")]) != 0
    assert cli(["slim", str(run_dir), "--out", str(tmp_path / "o"), "--round-to", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "o").exists()


def test_public_names_are_not_shadowed_by_subpackages() -> None:
    """Importing every subpackage keeps `p3b_deploy.slim` / `.prune` the functions (no package patch)."""
    import importlib

    import p3b_deploy
    for sub in ("surgery", "pruning", "export", "bench", "pipeline", "train", "models"):
        importlib.import_module(f"p3b_deploy.{sub}")
    from p3b_deploy.pruning.api import prune
    from p3b_deploy.surgery.core import slim
    assert p3b_deploy.slim is slim and p3b_deploy.prune is prune
    from p3b_deploy import slim as fn
    assert fn is slim
    assert type(p3b_deploy) is type(importlib)  # a plain module, no class patch
