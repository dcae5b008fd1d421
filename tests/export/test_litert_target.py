"""LiteRT as an export target (`export --format litert`), a bench backend (`litert`) and two
deployment targets (`litert-fp32`, `litert-int8`).

Fast: the target and format names; without litert-torch the format is refused in one line before
any work, without ai-edge-litert the backend is skipped with the reason. Slow (needs .venv-edge,
scripts/setup_edge.sh): a slim model (mean != std) is exported to a verified fp32 .tflite and a
gated static int8 .tflite that carry the ONNX file's metadata, then benched in a venv that has
only onnxruntime + ai-edge-litert + numpy + this package (--no-deps) and no torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from onnx_models import tiny_onnx
from p3b_deploy.artifacts import ArtifactError, TfliteFile, detect

ROOT = Path(__file__).resolve().parents[2]
EDGE_PY = ROOT / ".venv-edge" / "bin" / "python"
TORCH_FREE = ROOT / ".cache" / "venv-litert-torch-free"  # gitignored; made once, reused
_NO_CONVERTER = "import sys\nsys.modules['litert_torch'] = None\n"
_NO_RUNTIME = "import sys\nsys.modules['ai_edge_litert'] = None\n"


def _py(code: str, cwd: Path, python: str = sys.executable, timeout: int = 300, prefix: str = "",
        path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=path if path is not None else f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    return subprocess.run([python, "-c", prefix + textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_litert_targets_and_format_are_declared():
    from p3b_deploy.export.config import FORMATS
    from p3b_deploy.targets import get_target, needs_calibration
    assert "litert" in FORMATS
    fp32, int8 = get_target("litert-fp32"), get_target("litert-int8")
    assert (fp32.runtime, fp32.variant, fp32.backend, fp32.precision) == ("litert", "tflite", "litert", "fp32")
    assert (int8.runtime, int8.variant, int8.backend) == ("litert", "tflite-int8", "litert")
    assert needs_calibration(["litert-int8"]) and not needs_calibration(["litert-fp32"])


def test_tflite_paths_are_detected_with_their_fp32_onnx_sibling(tmp_path):
    with pytest.raises(ArtifactError, match="LiteRT model not found"):
        detect(tmp_path / "missing.tflite")
    for name in ("m.tflite", "m.int8.tflite", "m.onnx", "m.int8.onnx"):
        (tmp_path / name).write_bytes(b"x")
    for name in ("m.tflite", "m.int8.tflite"):  # an int8 file's parity reference is the fp32 ONNX file
        art = detect(tmp_path / name)
        assert isinstance(art, TfliteFile) and art.kind == "tflite" and art.onnx_sibling == tmp_path / "m.onnx"


def test_format_litert_without_the_converter_is_refused_in_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    p = _py(f"""
        from p3b_deploy.cli import main
        sys.exit(main(["export", "vit_pico_patch4_32", "--out", {str(tmp_path / 'out' / 'm.onnx')!r},
                       "--format", "litert", "--litert-batches", "1,8"]))
    """, tmp_path, prefix=_NO_CONVERTER)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: --format litert: litert-torch is not installed here: run bash "
                                             "scripts/setup_edge.sh"]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failing_conversion_is_refused_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import importlib.machinery
    import types

    import timm
    from p3b_deploy.errors import ExportError
    from p3b_deploy.export import export_onnx

    class Converter:  # stands in for litert_torch.Converter: accepts signatures, then fails like the real one can
        def signature(self, *args, **kwargs):
            return self

        def convert(self, **kwargs):
            raise RuntimeError("failed to legalize operation 'stablehlo.custom_call'\nmore detail")

    for name, attrs in (("litert_torch", {"Converter": Converter}), ("ai_edge_litert", {})):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    model = timm.create_model("vit_pico_patch4_32", num_classes=3).eval()
    with pytest.raises(ExportError) as e:
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32), format="litert", litert_batches=(1, 2),
                    verify_batches=(1,), profile_runs=1, profile_batch=1)
    assert str(e.value) == ("--format litert: conversion failed: RuntimeError: failed to legalize operation "
                            "'stablehlo.custom_call'")
    assert list(tmp_path.iterdir()) == []


def test_missing_litert_runtime_is_skipped_with_the_reason(tmp_path):
    a = tiny_onnx(tmp_path / "a.onnx")
    (tmp_path / "a.tflite").write_bytes(b"not read: the runtime is missing")
    p = _py(f"""
        from p3b_deploy.deploy import benchmark
        rep = benchmark([{str(a)!r}], backends=["ort-cpu", "tflite"], threads=1, warmup_seconds=0, min_iters=2,
                        min_seconds=0)
        print("ROWS", [r["backend"] for r in rep.results])
        print("SKIP", [(k["backend"], k["reason"]) for k in rep.skipped])
        from p3b_deploy.targets import get_target
        print("TARGET", get_target("litert-fp32").unavailable())
    """, tmp_path, prefix=_NO_RUNTIME)
    assert p.returncode == 0, p.stderr
    assert "ROWS ['ort-cpu']" in p.stdout
    assert ("SKIP [('litert', 'ai-edge-litert is not installed here: run bash scripts/setup_edge.sh (elsewhere: pip "
            "install ai-edge-litert)')]") in p.stdout
    assert "TARGET target litert-fp32: ai_edge_litert is not installed here" in p.stdout


def test_litert_batches_are_validated(tmp_path):
    from p3b_deploy.errors import ExportError
    from p3b_deploy.export.config import ExportConfig
    from p3b_deploy.export.exporter import _resolve_config
    from p3b_deploy.export.litert_tflite import litert_batches
    assert litert_batches(_resolve_config(None, {})) == [1, 7]  # 1 and the parity batches
    assert litert_batches(_resolve_config(ExportConfig(litert_batches=(32, 1, 8)), {})) == [1, 8, 32]
    assert litert_batches(_resolve_config(None, {"static_batch": 4})) == [4]
    with pytest.raises(ExportError, match=r"LiteRT batches must be >= 1, got \[1, 0\]"):
        _resolve_config(None, {"litert_batches": (1, 0)})


# ------------------------------------------------------------------------------------------ slow
_EXPORT = """
    import json, sys, torch, timm
    from plans import random_plan, randomize_
    from p3b_deploy import describe, slim
    from p3b_deploy.surgery.store import save_slim
    from p3b_deploy.cli import main
    torch.manual_seed(0)
    dense = randomize_(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                                         num_classes=10), seed=0).eval()
    save_slim(slim(dense, random_plan(describe(dense), seed=3, keep=0.5, remove_prob=0.25), residual_io="index"),
              "slim")
    sys.exit(main(["export", "slim", "--out", "out/m.onnx", "--format", "litert", "--litert-batches", "1,8",
                   "--int8", "static", "--data", "digits", "--calibration-images", "64", "--int8-max-drop", "5"]))
"""

_BENCH = """
    import importlib.util, json, sys
    print("TORCH", importlib.util.find_spec("torch") is not None)
    from p3b_deploy.cli import main
    from p3b_deploy.litert_io import read_metadata
    from p3b_deploy.onnx_io import load_onnx_session
    print("META", json.dumps([read_metadata("out/m.tflite"), read_metadata("out/m.int8.tflite"),
                              load_onnx_session("out/m.onnx")[1]]))
    rc = main(["bench", "out/m.onnx", "out/m.int8.tflite", "--providers", "cpu,litert", "--report", "rep",
               "--batch", "1,8,3", "--threads", "1", "--warmup-seconds", "0", "--min-iters", "3", "--min-seconds", "0",
               "--no-plot"])
    print("BENCH_RC", rc)
    print("MODULES", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "litert_torch")))
"""


def _torch_free_venv() -> Path:
    """A venv with onnxruntime + ai-edge-litert + numpy, and this package installed --no-deps."""
    py = TORCH_FREE / "bin" / "python"
    ort = subprocess.run([str(EDGE_PY), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                         capture_output=True, text=True).stdout.strip()
    pins = [f"onnxruntime=={ort}", "ai-edge-litert==2.3.0", "numpy"]
    marker = TORCH_FREE / "p3b-pins.txt"
    if not (py.is_file() and marker.is_file() and marker.read_text() == "\n".join(pins)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(TORCH_FREE)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], check=True,
                       timeout=900)
        marker.write_text("\n".join(pins))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--force-reinstall", str(ROOT)], check=True, timeout=600, capture_output=True)
    return py


@pytest.mark.slow
def test_slim_model_exports_to_tflite_fp32_and_int8_and_benches_without_torch(tmp_path):
    if not EDGE_PY.is_file():
        pytest.skip("LiteRT is not installed: run `bash scripts/setup_edge.sh` (.venv-edge)")
    p = _py(_EXPORT, tmp_path, python=str(EDGE_PY), timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "m.export.json").read_text())
    fp32, int8 = rep["litert"]["fp32"], rep["litert"]["int8"]
    # fp32: every signature verified against torch, random and real images
    assert fp32["batches"] == [1, 8] and fp32["precision"] == "fp32"
    assert {(c["data"], c["batch"]) for c in fp32["cases"]} == {("random", 1), ("random", 8), ("real", 1), ("real", 8)}
    assert fp32["max_abs_diff"] <= 1e-4 and all(c["top1_agreement"] == 100.0 for c in fp32["cases"])
    assert (tmp_path / "out" / "m.tflite").stat().st_size == fp32["size_bytes"]
    # int8: gated like the ONNX int8 files (labels: val top-1 within --int8-max-drop of fp32's)
    g = int8["gate"]
    assert g["data"].startswith("real") and g["batch"] == 256 and g["max_drop"] == 5.0
    assert g["ok"] and g["top1_fp32"] - g["top1"] <= 5.0
    assert int8["size_bytes"] < fp32["size_bytes"] and int8["convert_seconds"] > 0

    py = _torch_free_venv()
    b = _py(_BENCH, tmp_path, python=str(py), timeout=600, path="")
    out = b.stdout
    assert "TORCH False" in out and "BENCH_RC 0" in out, b.stderr[-3000:]
    assert "MODULES []" in out
    # the files carry the ONNX file's metadata: preprocessing (mean != std) and the data's class names
    m32, m8, onnx_meta = json.loads(next(ln for ln in out.splitlines() if ln.startswith("META "))[5:])
    assert m32 == onnx_meta
    assert m8 == {**onnx_meta, "precision": "int8", "quantization": "static"}
    assert json.loads(m32["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(m32["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert json.loads(m32["class_names"]) == [str(i) for i in range(10)]
    # bench: the .onnx on ORT and LiteRT (its sibling .tflite), the int8 .tflite on LiteRT; parity vs ORT fp32
    bench = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = {(r["model"], r["batch"]): r for r in bench["results"] if r["backend"] == "litert"}
    assert set(rows) == {("m", 1), ("m", 8), ("m.int8.tflite", 1), ("m.int8.tflite", 8)}
    for (model, _), r in rows.items():
        assert r["median_ms"] > 0 and r["parity_images"] == 32
        if model == "m":
            assert r["parity_max_abs_diff"] <= 1e-4 and r["parity_top1_agreement"] == 100.0
        else:
            assert r["parity_top1_agreement"] >= 75.0 and r["inference_precision"] == "int8"
    skipped = {(k["model"], k["backend"], k["batch"]): k["reason"] for k in bench["skipped"]}
    assert skipped[("m", "litert", 3)] == ("m.tflite has no signature for batch 3 (it has batches [1, 8]: export "
                                           "--format litert --litert-batches ...)")
