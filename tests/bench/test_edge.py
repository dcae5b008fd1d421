"""The ONNX benchmark path on an 'edge device': torch made unimportable, API and CLI still work."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from onnx_models import tiny_onnx

_NO_TORCH = "import sys\nfor m in ('torch', 'torchvision', 'timm', 'torch_pruning'):\n    sys.modules[m] = None\n"


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_TORCH + textwrap.dedent(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_api_without_torch(tmp_path):
    a, b = tiny_onnx(tmp_path / "a.onnx", 256), tiny_onnx(tmp_path / "b.onnx", 64)
    p = _run(f"""
        from p3b_deploy.bench import benchmark
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
