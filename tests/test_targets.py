"""Deployment targets: one name per runtime x precision x file, usable in every command that takes
one, or refused in one line before any work."""
from __future__ import annotations

import importlib.util
import json

import pytest

from p3b_deploy.cli import main as cli
from p3b_deploy.targets import TARGETS, TargetError, get_target, needs_calibration, targets_of

ONNX_TARGETS = [n for n, t in TARGETS.items() if t.runs_onnx]


def test_names_and_settings():
    t = get_target("ort-int8", threads=2, batch=32)
    assert (t.runtime, t.variant, t.int8, t.threads, t.batch) == ("ort", "int8-dynamic", "dynamic", 2, 32)
    assert TARGETS["ort-int8"].threads == 1 and TARGETS["ort-int8"].batch == 1  # registry untouched
    assert get_target("executorch-fp32").name == "executorch"  # alias
    assert [t.name for t in targets_of("ort-fp32, ort-fp32,openvino-int8")] == ["ort-fp32", "openvino-int8"]
    assert needs_calibration("ort-int8,openvino-int8") and not needs_calibration(["ort-int8", "openvino-f32"])
    with pytest.raises(TargetError) as e:
        get_target("tflite-int4")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in TARGETS)
    with pytest.raises(TargetError, match="threads must be >= 1"):
        get_target("ort-fp32", threads=0)


def test_missing_runtime_is_refused_in_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(TargetError) as e:
        get_target("openvino-int8").check()
    assert str(e.value) == "target openvino-int8: openvino is not installed here (pip install openvino (or the " \
                           "extra .[openvino]))"
    assert get_target("ort-int8").check().name == "ort-int8"


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_in_export_config(name):
    from p3b_deploy.export.config import ExportConfig
    t = TARGETS[name]
    if t.unavailable():
        with pytest.raises(TargetError):
            ExportConfig(target=name).for_target()
        return
    cfg = ExportConfig(target=name).for_target()
    assert cfg.int8 == t.int8
    # OpenVINO int8 runs the static QDQ ONNX file; OpenVINO f32/bf16 its IR; ExecuTorch its .pte
    assert cfg.format == {"openvino-f32": "openvino", "openvino-bf16": "openvino", "executorch": "executorch",
                          "executorch-int8": "executorch", "litert-fp32": "litert", "litert-int8": "litert"}.get(
        name, "onnx")
    assert cfg.for_target() == cfg  # idempotent


def test_export_target_contradicting_an_option_is_one_line():
    from p3b_deploy.errors import ExportError
    from p3b_deploy.export.config import ExportConfig
    with pytest.raises(ExportError, match="--target ort-int8 writes int8 dynamic; it contradicts --int8 static"):
        ExportConfig(target="ort-int8", int8="static").for_target()


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_in_prune_and_run_configs(name):
    from p3b_deploy.pipeline.config import RunConfig
    from p3b_deploy.pipeline.latency import run_target
    from p3b_deploy.pruning.config import P3BConfig
    assert P3BConfig(target=name).target == name
    t = run_target(RunConfig(target=name, bench={"threads": 1, "batches": [8, 32]}))
    assert (t.name, t.threads, t.batch) == (name, 1, 8)


def test_unknown_target_refused_by_every_command(tmp_path, capsys):
    commands = [["latency-table", str(tmp_path), "--out", str(tmp_path / "t.json"), "--target", "npu"],
                ["prune", "--model", "vit_nano_patch4_16", "--data", "digits", "--out", str(tmp_path / "r"),
                 "--target", "npu", "--latency-target", "0.5"],
                ["export", "vit_nano_patch4_16", "--out", str(tmp_path / "m.onnx"), "--target", "npu"],
                ["bench", "m.onnx", "--report", str(tmp_path / "b"), "--target", "npu"],
                ["run", "--out", str(tmp_path / "o"), "--target", "npu"]]
    for cmd in commands:
        assert cli(cmd) == 2, cmd
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unknown deployment target 'npu'" in err[0], (cmd, err)
    assert not any(tmp_path.iterdir())  # nothing written by any of them


def test_latency_table_on_an_edge_target_refuses_what_it_cannot_lower(tmp_path, capsys):
    from tables import fake_pack
    pack = fake_pack(tmp_path / "pack")
    rc = cli(["latency-table", str(pack), "--out", str(tmp_path / "t.json"), "--target", "executorch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    # without ExecuTorch: not installed; with it: the hand-made pack cannot rebuild its probes
    assert ("remake the pack with this version" in err[0]) or ("not installed" in err[0])
    assert not (tmp_path / "t.json").exists()


def test_bench_target_picks_the_int8_sibling_or_refuses(tmp_path):
    from tables import graph as _graph
    from p3b_deploy.deploy.files import target_file
    from p3b_deploy.errors import BenchError
    from p3b_deploy.onnx_quant import quantize_dynamic_int8
    f = tmp_path / "model.onnx"
    _graph(f, [5, 8], [16], 8, 8)
    with pytest.raises(BenchError, match="has no model.int8.onnx next to it"):
        target_file(str(f), get_target("ort-int8"))
    quantize_dynamic_int8(f, tmp_path / "model.int8.onnx")
    assert target_file(str(f), get_target("ort-int8")) == str(tmp_path / "model.int8.onnx")
    with pytest.raises(BenchError, match="runs static int8, but model.int8.onnx is dynamic int8"):
        target_file(str(f), get_target("ort-int8-static"))
    assert target_file(str(f), get_target("ort-fp32")) == str(f)
    with pytest.raises(BenchError, match="is not one: export it"):
        target_file(str(tmp_path), get_target("ort-int8"))
