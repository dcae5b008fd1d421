"""Latency probes for the edge targets (ExecuTorch, LiteRT): the pack's probe modules rebuilt from
its manifest are the graphs its ONNX files hold (checked against onnxruntime, on the branch's own
contribution so that a rebuild with other weights fails), lowered files are cached and reused until
the pack changes, and a pack made before the manifest's build record is refused in one line.
Fast tests use a stand-in lowering function (no ExecuTorch / LiteRT needed). Slow (needs
.venv-edge, scripts/setup_edge.sh): real litert-fp32 and executorch tables of a tiny demo pack."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from p3b_deploy.bench.latency_table import LatencyTableError, pack_models, read_manifest
from p3b_deploy.targets import get_target

ROOT = Path(__file__).resolve().parents[2]
EDGE_PY = ROOT / ".venv-edge" / "bin" / "python"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    import torch
    from p3b_deploy.export.latency_pack import make_pack
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("edge") / "pack"
    make_pack("vit_nano_patch4_16", out, repeats=1, steps=1, plans=1, threads=1)
    return out


def _copy(pack: Path, dst: Path) -> Path:
    shutil.copytree(pack, dst)
    return dst


def test_rebuilt_probes_are_the_packs_graphs(pack):
    """Every pack label is rebuilt, and each rebuilt module computes what the pack's ONNX file
    computes (onnxruntime, same input): the rebuild is the same graph with the same weights."""
    import onnxruntime as ort
    import torch
    from p3b_deploy.export.latency_pack import probes_from_manifest
    m = read_manifest(pack)
    assert set(m["build"]) >= {"model", "img_size", "patch_size", "num_classes", "repeats", "steps", "plans"}
    probes = probes_from_manifest(m).modules
    files = pack_models(pack)
    assert set(probes) == set(files) and len(files) == 10  # 2 widths x 2 kinds, 2 io, null, fixed, dense, 1 plan
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for label, path in files.items():
        module, example = probes[label]
        x = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = module(x).numpy()
        if want.shape == x.shape:  # a branch chain: compare what the branches add to the residual
            got, want = got - x.numpy(), want - x.numpy()
        scale = float(np.abs(want).max())
        if label == "null":
            assert scale == 0.0 and float(np.abs(got).max()) == 0.0
            continue
        assert scale > 1e-3, label  # the comparison can fail: the probe does change its input
        assert float(np.abs(got - want).max()) <= 1e-4 * max(scale, 1.0), label


def _stand_in(calls: list):
    def lower(module, example, target, label, batch, path):
        calls.append(label)
        path.write_bytes(f"{target.name} {label} b{batch} {tuple(example.shape)}".encode())
    return lower


def test_lowered_probes_are_cached_until_the_pack_changes(pack, tmp_path):
    from p3b_deploy.export.edge_probes import lower_probes
    p = _copy(pack, tmp_path / "pack")
    t = get_target("executorch")
    calls: list = []
    first = lower_probes(p, t, 1, lower=_stand_in(calls), progress=False)
    assert set(first.files) == set(pack_models(p)) and sorted(calls) == sorted(first.lowered) == sorted(first.files)
    for label, f in first.files.items():
        assert Path(f) == p / "pte" / f"{label}.b1.pte" and Path(f).read_bytes().startswith(b"executorch " + label.encode())
    assert not [f for f in (p / "pte").iterdir() if f.name.endswith(".tmp")]  # written atomically
    calls.clear()
    again = lower_probes(p, t, 1, lower=_stand_in(calls), progress=False)
    assert calls == [] and again.lowered == [] and again.files == first.files  # reused
    # another batch, another variant: their own files
    lower_probes(p, t, 2, lower=_stand_in(calls), progress=False)
    assert len(calls) == len(first.files) and (p / "pte" / "dense.b2.pte").is_file()
    calls.clear()
    q = lower_probes(p, get_target("litert-int8"), 1, lower=_stand_in(calls), progress=False)
    assert Path(q.files["dense"]) == p / "tflite-int8" / "dense.b1.tflite" and len(calls) == len(first.files)
    # a stale file (older than the manifest) and a missing one are lowered again, the rest reused
    calls.clear()
    later = time.time() + 5
    os.utime(p / "manifest.json", (later, later))
    for label in ("fixed", "plan_0"):
        os.utime(first.files[label], (later + 5, later + 5))
    Path(first.files["mlp_1"]).unlink()
    lower_probes(p, t, 1, lower=_stand_in(calls), progress=False)
    assert sorted(calls) == sorted(set(first.files) - {"fixed", "plan_0"})


def test_a_failed_lowering_leaves_no_file(pack, tmp_path):
    from p3b_deploy.errors import ExportError
    from p3b_deploy.export.edge_probes import lower_probes
    p = _copy(pack, tmp_path / "pack")

    def broken(module, example, target, label, batch, path):
        path.write_bytes(b"half")
        raise ExportError("boom")
    with pytest.raises(ExportError, match="boom"):
        lower_probes(p, get_target("litert-fp32"), 1, lower=broken, progress=False)
    assert list((p / "tflite").iterdir()) == []


def test_old_pack_is_refused_for_edge_targets_in_one_line(pack, tmp_path, monkeypatch):
    from p3b_deploy.bench import latency_table as lt
    from p3b_deploy.export.edge_probes import lower_probes
    from p3b_deploy.targets import Target
    p = _copy(pack, tmp_path / "pack")
    m = json.loads((p / "manifest.json").read_text())
    del m["build"]
    (p / "manifest.json").write_text(json.dumps(m))
    calls: list = []
    with pytest.raises(LatencyTableError) as e:
        lower_probes(p, get_target("executorch"), 1, lower=_stand_in(calls), progress=False)
    assert "\n" not in str(e.value) and "remake the pack with this version" in str(e.value) and calls == []
    # measure_pack: the same line, before any timing (the runtime check passed by hand)
    monkeypatch.setattr(Target, "unavailable", lambda self: None)
    monkeypatch.setattr(lt, "table_from_report", lambda *a, **k: pytest.fail("timed an old pack"))
    with pytest.raises(LatencyTableError, match="remake the pack with this version"):
        lt.measure_pack(p, target="litert-fp32")
    assert not (p / "tflite").exists() or not any((p / "tflite").iterdir())
    # ONNX targets still time it
    assert read_manifest(p)["files"]["dense"] == "dense.onnx"


def test_edge_target_without_its_runtime_is_refused_before_any_work(pack, tmp_path, capsys, monkeypatch):
    from p3b_deploy.cli import main as cli
    from p3b_deploy.targets import Target
    monkeypatch.setattr(Target, "unavailable", lambda self: f"target {self.name}: executorch is not installed here")
    p = _copy(pack, tmp_path / "pack")
    assert cli(["latency-table", str(p), "--out", str(tmp_path / "t.json"), "--target", "executorch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: target executorch: executorch is not installed here"]
    assert not (tmp_path / "t.json").exists() and not (p / "pte").exists()


@pytest.mark.slow
def test_edge_tables_of_a_tiny_pack(tmp_path):
    """Real litert-fp32 and executorch tables of a demo-geometry pack (in .venv-edge)."""
    if not EDGE_PY.exists():
        pytest.skip("ExecuTorch / LiteRT are not installed: run `bash scripts/setup_edge.sh` (.venv-edge)")
    code = textwrap.dedent(f"""
        import json, sys
        import torch
        torch.set_num_threads(1)
        from p3b_deploy.export.latency_pack import make_pack
        from p3b_deploy.bench.latency_table import LatencyTable, LatencyTableError, measure_pack
        pack = {str(tmp_path / 'pack')!r}
        make_pack("vit_nano_patch4_16", pack, repeats=2, steps=2, plans=2, threads=1)
        out = {{}}
        for name in ("litert-fp32", "executorch"):
            # ~8 interleaved rounds a probe: a load burst on a shared CI box cannot own a median
            t = measure_pack(pack, batch=1, threads=1, target=name, min_seconds=1.5, warmup_seconds=0.3)
            t.save({str(tmp_path)!r} + f"/{{name}}.json")
            try:
                t.check_target("ort-fp32")
                refused = False
            except LatencyTableError:
                refused = True
            out[name] = {{"target": t.target, "refused": refused, "dense": t.dense_check,
                         "correction": {{k: v for k, v in t.correction.items() if k != "points"}},
                         "curves": {{k: c.ms for k, c in t.curves.items()}}}}
        print("RESULT " + json.dumps(out))
    """)
    p = subprocess.run([str(EDGE_PY), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name, r in res.items():
        assert r["target"] == name and r["refused"], name
        for ms in r["curves"].values():
            assert all(b >= a for a, b in zip(ms, ms[1:])) and ms[-1] > 0, (name, ms)
        assert abs(r["dense"]["predicted_ms"] / r["dense"]["measured_ms"] - 1) <= 0.25, (name, r["dense"], r["correction"])
    assert (tmp_path / "pack" / "pte" / "dense.b1.pte").is_file()
    assert (tmp_path / "pack" / "tflite" / "dense.b1.tflite").is_file()
