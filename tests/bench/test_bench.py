"""Benchmark harness: interleaving, stopping rule, statistics, ratios, skipped backends, reports, CLI."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from p3b_deploy.bench import BACKENDS, Backend, BenchReport, Runner
from p3b_deploy.deploy import benchmark
from p3b_deploy.bench.stats import latency_stats
from p3b_deploy.cli import main as cli_main
from p3b_deploy.errors import BenchError
from onnx_models import tiny_onnx


def test_latency_stats_numbers():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 10.0], batch=4)
    assert s["min_ms"] == 1.0 and s["median_ms"] == 3.0 and s["mean_ms"] == 4.0
    assert s["p90_ms"] == pytest.approx(7.6)  # linear interpolation between 4 and 10
    assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
    assert s["cv"] == pytest.approx(s["std_ms"] / 4.0) and s["noisy"]
    assert s["throughput"] == pytest.approx(4 * 1000 / 3.0)
    assert not latency_stats([5.0, 5.0, 5.1], batch=1)["noisy"]


# --------------------------------------------------------------------------------------------
# A fake backend: deterministic times per model, records the call order
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_backend():
    calls: list[str] = []
    times = {"big": 8.0, "small": 2.0}

    def prepare(src, batch, precision, threads, work_dir):
        def step():
            calls.append(src.label)
            return times[src.label] * batch
        return Runner(step=step, info={"device": "fake"})
    BACKENDS["fake"] = lambda: Backend("fake", "none", lambda precision: None, prepare)
    BACKENDS["never"] = lambda: Backend("never", "none", lambda precision: "no such device here", prepare)
    yield calls
    del BACKENDS["fake"], BACKENDS["never"]


@pytest.fixture(scope="module")
def two_vits():
    import timm
    import p3b_deploy.models.vit  # noqa: F401 — registers vit_pico_patch4_32
    big = timm.create_model("vit_pico_patch4_32", depth=2).eval()
    small = timm.create_model("vit_pico_patch4_32", depth=2, mlp_ratio=2.0).eval()
    return big, small


def test_interleaved_rounds_and_ratios(fake_backend, two_vits):
    big, small = two_vits
    rep = benchmark({"big": big, "small": small}, backends=["fake", "never"], batches=[1, 2], warmup_seconds=0,
                    warmup_iters=1, min_iters=5, min_seconds=0, round_seconds=0)
    # per batch: first run + 1 warm-up each (setup, sequential), then A B A B ... one run per turn
    per_batch = ["big", "big", "small", "small"] + ["big", "small"] * 5
    assert fake_backend == per_batch * 2
    r = rep.result("small", "fake", 2)
    assert r["median_ms"] == 4.0 and r["iters"] == 5 and r["throughput"] == pytest.approx(500.0)
    assert r["speedup"] == pytest.approx(4.0)
    from p3b_deploy.models.vit import count_model
    red = count_model(big).macs / count_model(small).macs
    assert r["mac_reduction"] == pytest.approx(red) and 1.2 < red < 2.0
    assert r["speedup_efficiency"] == pytest.approx(4.0 / red)
    assert rep.result("big", "fake", 1)["speedup"] == 1.0
    assert {(k["model"], k["backend"], k["reason"]) for k in rep.skipped} == {
        ("big", "never", "no such device here"), ("small", "never", "no such device here")}


def test_min_seconds_bounds_the_loop(fake_backend, two_vits):
    big, small = two_vits
    rep = benchmark({"big": big, "small": small}, backends=["fake"], batches=[1], warmup_seconds=0,
                    warmup_iters=0, min_iters=1, min_seconds=0.05, round_seconds=0.01)
    # small: 2 ms per (fake) run -> needs >= 25 runs for 50 ms; turns of round_seconds/2ms = 5 runs
    assert rep.result("small", "fake", 1)["iters"] >= 25
    assert rep.result("big", "fake", 1)["timed_s"] >= 0.05


def test_report_files(fake_backend, two_vits, tmp_path):
    big, small = two_vits
    rep = benchmark({"big": big, "small": small}, backends=["fake", "never"], batches=[1], warmup_seconds=0,
                    min_iters=3, min_seconds=0, round_seconds=0)
    rep.save(tmp_path)
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["format"] == "p3b-bench-report" and len(d["results"]) == 2 and len(d["skipped"]) == 2
    for k in ("model", "backend", "batch", "median_ms", "p90_ms", "throughput", "macs", "params", "speedup",
              "speedup_efficiency"):
        assert k in d["results"][0]
    assert d["system"]["cpu"] and d["system"]["versions"]["onnxruntime"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert [r["model"] for r in rows] == ["big", "small"] and float(rows[1]["speedup"]) == pytest.approx(4.0)
    md = (tmp_path / "report.md").read_text()
    assert "| small | 1 | 2.00 |" in md and "no such device here" in md
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert BenchReport.from_dict(d).result("small", "fake", 1)["median_ms"] == 2.0


def test_ort_cpu_on_onnx_files_and_torch_skipped_gpu(tmp_path):
    a, b = tiny_onnx(tmp_path / "a.onnx", 256), tiny_onnx(tmp_path / "b.onnx", 64)
    rep = benchmark([a, b], backends=["ort-cpu", "ort-cuda"], batches=[1, 4], threads=1, warmup_seconds=0,
                    min_iters=20, min_seconds=0.02)
    r = rep.result("b", "ort-cpu", 4)
    assert r["macs"] == 192 * 64 + 64 * 10 and r["params"] == 192 * 64 + 640
    assert r["mac_reduction"] == pytest.approx((192 * 256 + 2560) / (192 * 64 + 640))
    assert r["iters"] >= 20 and r["providers"] == ["CPUExecutionProvider"]
    assert r["backend_info"]["intra_op_threads"] == 1
    cuda = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
    measured = {(r["model"], r["backend"], r["batch"]) for r in rep.results}
    cpu = {(m, "ort-cpu", bs) for m in "ab" for bs in (1, 4)}
    if cuda:  # both outcomes are checked: a GPU machine must measure ort-cuda, not skip it
        assert measured == cpu | {(m, "ort-cuda", bs) for m in "ab" for bs in (1, 4)} and not rep.skipped
    else:
        assert measured == cpu and {k["backend"] for k in rep.skipped} == {"ort-cuda"}
        assert "not in this onnxruntime build" in rep.skipped[0]["reason"]


def test_torch_cpu_backend(two_vits):
    big, small = two_vits
    rep = benchmark({"big": big, "small": small}, backends=["torch-cpu"], batches=[2], threads=1,
                    warmup_seconds=0, min_iters=3, min_seconds=0)
    for name, model in (("big", big), ("small", small)):
        r = rep.result(name, "torch-cpu", 2)
        assert r["iters"] >= 3 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(2 * 1000.0 / r["median_ms"], rel=1e-9)
        assert r["params"] == sum(p.numel() for p in model.parameters())
    # small = big with half the MLP hidden: exactly the fc1/fc2 parameters and MACs fewer
    b, s = rep.result("big", "torch-cpu", 2), rep.result("small", "torch-cpu", 2)
    D, hid, depth, tokens = 96, 384, 2, 65  # vit_pico at 32 px: 8x8 patches + cls
    assert b["params"] - s["params"] == depth * (2 * D * (hid // 2) + hid // 2)
    assert b["macs"] - s["macs"] == depth * tokens * 2 * D * (hid // 2)
    assert s["mac_reduction"] == pytest.approx(b["macs"] / s["macs"])
    assert torch.get_num_threads() == 1
    assert rep.system["thread_env"]["OMP_NUM_THREADS"] == "1"


def test_cli_prints_table_and_writes_report(tmp_path, capsys):
    a, b = tiny_onnx(tmp_path / "a.onnx", 128), tiny_onnx(tmp_path / "b.onnx", 32)
    rc = cli_main(["bench", a, b, "--report", f"{tmp_path}/rep/", "--batch", "1,2", "--threads", "1",
                   "--min-iters", "5", "--min-seconds", "0", "--warmup-seconds", "0", "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0 and "### ort-cpu (fp32)" in out and "| b | 2 |" in out
    assert len(json.loads((tmp_path / "rep" / "report.json").read_text())["results"]) == 4
    # --report DIR/ is printed as DIR/, not DIR//
    assert f"report written to {tmp_path}/rep/ (report.json, report.md, report.csv)\n" in out and "//" not in out


@pytest.mark.parametrize("argv, msg", [
    (["missing.onnx"], "ONNX file not found"),
    (["x.onnx", "--providers", "onnxrt"], "unknown backend 'onnxrt'"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, msg):
    if argv[0] == "x.onnx":
        argv = [tiny_onnx(tmp_path / "x.onnx")] + argv[1:]
    rc = cli_main(["bench", *argv, "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.parametrize("name, data, msg", [
    ("bad.onnx", b"not a protobuf", "bad.onnx is not an ONNX model (protobuf parsing failed"),
    ("empty.onnx", b"\x08\x08", "empty.onnx is not an ONNX model (no graph with inputs and outputs)"),
    ("bad.pte", b"not an ExecuTorch program", "bad.pte is not an ExecuTorch program"),
])
def test_a_file_that_is_not_a_model_is_refused_before_timing(tmp_path, capsys, monkeypatch, name, data, msg):
    """`bench good.onnx bad.onnx` stops in one line (exit 2) before timing good.onnx, no report."""
    import p3b_deploy.bench.runner as runner
    good, bad = tiny_onnx(tmp_path / "good.onnx"), tmp_path / name
    bad.write_bytes(data)
    timed = []
    monkeypatch.setattr(runner, "_measure", lambda *a, **k: timed.append(a) or ([], []))
    rc = cli_main(["bench", good, str(bad), "--report", str(tmp_path / "r"), "--providers", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert timed == [] and not (tmp_path / "r").exists()
    with pytest.raises(BenchError, match="is not an"):  # the Python API refuses it the same way
        benchmark([good, str(bad)], backends=["ort-cpu"], warmup_seconds=0, min_iters=2, min_seconds=0)


def test_onnx_check_without_the_onnx_package_uses_onnxruntime(tmp_path, monkeypatch):
    """On an edge install (onnxruntime + numpy) the check opens the file in ORT instead."""
    import sys
    from p3b_deploy.errors import ExportError
    from p3b_deploy.onnx_io import check_onnx_file
    good, bad = tiny_onnx(tmp_path / "good.onnx"), tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    check_onnx_file(good)
    with pytest.raises(ExportError, match="bad.onnx is not a loadable ONNX model: .*INVALID_PROTOBUF"):
        check_onnx_file(bad)


def test_a_named_runtime_that_cannot_run_is_refused_but_a_default_one_is_skipped(tmp_path, capsys):
    """--providers names a runtime on purpose: refused in one line before timing. The default
    backend (no --providers) that cannot run keeps the report's skipped row."""
    a = tiny_onnx(tmp_path / "a.onnx")
    rc = cli_main(["bench", a, "--report", str(tmp_path / "r"), "--providers", "cpu", "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: runtime 'cpu' cannot run here at bf16: bf16 is not supported on the "
                               "ONNX Runtime backends"]
    assert not (tmp_path / "r").exists()
    rc = cli_main(["bench", a, "--report", str(tmp_path / "r"), "--precision", "bf16"])
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rc == 1 and rep["results"] == []
    assert [(k["backend"], k["reason"]) for k in rep["skipped"]] == [
        ("ort-cpu", "bf16 is not supported on the ONNX Runtime backends")]


def test_gpu_check_script_dry_run_and_loud_failure_without_gpu():
    import shutil
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    p = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "would run: TensorRT fp16" in p.stdout and "dry run OK" in p.stdout
    if shutil.which("nvidia-smi") is None:  # no GPU: must fail loudly before installing anything
        p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "no NVIDIA GPU found" in p.stderr
        assert "pip" not in p.stdout
