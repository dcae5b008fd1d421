"""CLI flags come from the typed configs; the parser and the ONNX bench path import no torch."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from p3b_deploy.cli import build_parser
from p3b_deploy.cli.options import cli_fields, flag_of
from p3b_deploy.export.config import ExportConfig
from p3b_deploy.pipeline.config import RunConfig
from p3b_deploy.pruning.config import PROBES, P3BConfig
from p3b_deploy.train.config import TrainConfig


def _sub(parser, name):
    return next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == name)[1]


def _flags(sub) -> dict[str, object]:
    return {s: a for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("stage, cls", [("prune", P3BConfig), ("finetune", TrainConfig), ("run", RunConfig)])
def test_every_cli_field_has_its_flag_help_and_default(stage, cls):
    flags = _flags(_sub(build_parser(), stage))
    fields = cli_fields(cls) if stage != "run" else cli_fields(RunConfig)
    assert fields, cls
    for f in fields:
        a = flags[flag_of(f)]
        assert a.default is None, f"{f.name}: generated flags default to None (= not given)"
        assert f.metadata["help"] and a.help.startswith(f.metadata["help"]), f.name
        if f.metadata.get("choices"):
            assert tuple(a.choices) == tuple(f.metadata["choices"]), f.name


def test_choices_come_from_the_constants():
    flags = _flags(_sub(build_parser(), "prune"))
    assert tuple(flags["--probe"].choices) == PROBES
    assert tuple(flags["--amp"].choices) == ("auto", "bf16", "fp16", "off")
    exp = _flags(_sub(build_parser(), "export"))
    assert {"--fp16", "--no-fp16", "--int8", "--triton-repo", "--static-batch"} <= set(exp)
    assert exp["--triton-max-batch"].help.endswith("(default: 32)")
    assert [f.name for f in dataclasses.fields(ExportConfig) if f.name == "tol"]  # kept as config, not a flag
    assert "--tol" not in exp


def test_run_prune_flags_show_runs_defaults_not_the_librarys():
    flags = _flags(_sub(build_parser(), "run"))
    assert flags["--epochs"].dest == "prune.epochs" and flags["--epochs"].help.endswith("(default: 8.0)")
    assert flags["--prune-residual"].help.endswith("(default: off)")


_BROKEN_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class _Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm", "torch_pruning"):
                raise ImportError("libcudart.so.12: cannot open shared object file", name=name)
    sys.meta_path.insert(0, _Broken())
""")


def _py(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BROKEN_TORCH + textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def test_bench_onnx_where_torch_is_broken(tmp_path):
    """`import torch` raises ImportError (not ModuleNotFoundError): bench on .onnx still works, and a
    torch stage fails with one line, not a traceback."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    p = _py("""
        try:
            import torch
        except ImportError as e:
            assert not isinstance(e, ModuleNotFoundError)
        from p3b_deploy.cli import main
        rc = main(["bench", "m.onnx", "--report", "rep", "--min-iters", "2", "--min-seconds", "0",
                   "--warmup-seconds", "0", "--no-plot"])
        assert rc == 0, rc
        rc = main(["slim", "nowhere", "--out", "o"])
        print("RC", rc)
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rep" / "report.json").is_file()
    assert "RC 2" in p.stdout
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: stage 'slim' needs") and "Traceback" not in p.stderr, err


def test_plan_and_parser_import_no_torch(tmp_path):
    code = """
        import sys
        import p3b_deploy.plan, p3b_deploy.spec, p3b_deploy.artifacts, p3b_deploy.pruning.config
        from p3b_deploy.cli import build_parser
        build_parser()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torch_pruning"))
        print("HEAVY", heavy)
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout, p.stdout
