"""The ONNX benchmark path on an 'edge device': torch made unimportable, API and CLI still work."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from onnx_models import tiny_onnx

_NO_TORCH = "import sys\nfor m in ('torch', 'torchvision', 'timm', 'torch_pruning'):\n    sys.modules[m] = None\n"


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_TORCH + textwrap.dedent(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_api_without_torch(tmp_path):
    a, b = tiny_onnx(tmp_path / "a.onnx", 256), tiny_onnx(tmp_path / "b.onnx", 64)
    p = _run(f"""
        from p3b_deploy.deploy import benchmark
        rep = benchmark([{a!r}, {b!r}], backends=["ort-cpu", "torch-cpu"], batches=[1, 2], threads=1,
                        warmup_seconds=0, min_iters=5, min_seconds=0)
        rep.save("out")
        assert all(v is None for k, v in sys.modules.items() if k.split(".")[0] == "torch"), "torch got imported"
        print("OK", len(rep.results))
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "OK 4" in p.stdout
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["results"][1]["macs"] == 192 * 64 + 640  # counted from the ONNX graph, no torch
    assert {k["backend"] for k in d["skipped"]} == {"torch-cpu"}
    assert "torch is not importable" in d["skipped"][0]["reason"]


def test_cli_without_torch(tmp_path):
    a = tiny_onnx(tmp_path / "a.onnx")
    p = _run(f"""
        from p3b_deploy.cli import main
        rc = main(["bench", {a!r}, "--report", "rep", "--threads", "1", "--min-iters", "3", "--min-seconds", "0",
                   "--warmup-seconds", "0", "--torch"])
        sys.exit(rc)
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "| a | 1 |" in p.stdout and "torch is not importable" in p.stdout
    assert (tmp_path / "rep" / "report.csv").read_text().startswith("model,backend,precision,batch,median_ms")
    # the module entry point documented for edge devices
    p = _run(f"""
        import runpy
        sys.argv = ["p3b_deploy.cli.bench", {a!r}, "--report", "rep2", "--min-iters", "2", "--min-seconds", "0",
                    "--warmup-seconds", "0", "--no-plot"]
        runpy.run_module("p3b_deploy.cli.bench", run_name="__main__")
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rep2" / "report.json").is_file() and not (tmp_path / "rep2" / "latency.png").exists()


# ------------------------------------------------------------------------------ OpenVINO next to ORT
@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    """The shipped demo model (trained weights) exported once, as an edge device would receive it."""
    import torch
    from p3b_deploy.export import export_onnx
    from p3b_deploy.models import load_model
    from p3b_deploy.models.demo import demo_checkpoint_path
    torch.set_num_threads(1)
    model = load_model("vit_nano_patch4_16", checkpoint=str(demo_checkpoint_path())).eval()
    out = tmp_path_factory.mktemp("demo") / "demo.onnx"
    export_onnx(model, out, input_size=(3, 16, 16), verify_batches=(2,), profile_runs=1, threads=1)
    return str(out)


def test_openvino_parity_on_demo_model_without_torch(demo_onnx, tmp_path):
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'p3b-deploy[openvino]')")
    p = _run(f"""
        from p3b_deploy.cli import main
        rc = main(["bench", {demo_onnx!r}, "--providers", "cpu,openvino", "--report", "rep", "--threads", "1",
                   "--batch", "1,4", "--min-iters", "3", "--min-seconds", "0", "--warmup-seconds", "0", "--no-plot"])
        assert all(v is None for k, v in sys.modules.items() if k.split(".")[0] == "torch"), "torch got imported"
        sys.exit(rc)
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    d = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = {(r["backend"], r["batch"]): r for r in d["results"]}
    assert set(rows) == {("ort-cpu", 1), ("ort-cpu", 4), ("openvino", 1), ("openvino", 4)} and not d["skipped"]
    for b in (1, 4):
        ov, ort = rows[("openvino", b)], rows[("ort-cpu", b)]
        assert ov["precision"] == "fp32" and ov["inference_precision"] == "f32"  # never bf16 unless asked
        assert ov["parity_images"] == 32 and ov["parity_top1_agreement"] == 100.0
        assert 0.0 <= ov["parity_max_abs_diff"] <= 1e-4
        assert ort["parity_max_abs_diff"] is None  # the reference itself
    assert "| max abs diff vs ORT fp32 | top-1 agreement |" in p.stdout and "openvino (fp32, computes f32)" in p.stdout


def test_missing_openvino_is_skipped_with_the_reason(tmp_path):
    a = tiny_onnx(tmp_path / "a.onnx")
    p = _run(f"""
        sys.modules["openvino"] = None
        from p3b_deploy.deploy import benchmark
        rep = benchmark([{a!r}], backends=["ort-cpu", "openvino"], threads=1, warmup_seconds=0, min_iters=2,
                        min_seconds=0)
        print("ROWS", [r["backend"] for r in rep.results])
        print("SKIP", [(k["backend"], k["batch"], k["reason"]) for k in rep.skipped])
    """, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "ROWS ['ort-cpu']" in p.stdout
    assert ("SKIP [('openvino', None, \"openvino is not installed (pip install 'p3b-deploy[openvino]')\")]"
            in p.stdout)
