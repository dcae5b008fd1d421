"""The "Prune for your device" page runs as written: pack -> table -> prune -> slim -> export (slim and
dense) -> bench, on the demo model, read from the page's code block, outputs moved into tmp_path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from docs_commands import REPO, code_blocks, commands_in

PAGE = REPO / "docs" / "guides" / "prune-for-your-device.md"
ASSETS = "p3b_deploy/assets/"  # inputs shipped in the repository (the demo checkpoint)


def page_sequence() -> list[list[str]]:
    """The argv of every p3b-deploy command in the page's code blocks, in order."""
    text = PAGE.read_text(encoding="utf-8")
    return [list(c.argv) for _, body in code_blocks(text) for c in commands_in(body, PAGE.name)]


def test_page_shows_the_whole_sequence():
    stages = [argv[0] for argv in page_sequence()]
    assert stages == ["latency-pack", "latency-table", "prune", "slim", "export", "export", "bench"]
    prune = page_sequence()[2]
    assert prune[prune.index("--budget") + 1] == "latency"
    exports = [argv[1] for argv in page_sequence() if argv[0] == "export"]
    assert exports == ["device/slim", "vit_nano_patch4_16"]  # the slim model and the dense baseline


@pytest.mark.slow
def test_prune_for_your_device_page_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg"}
    for argv in page_sequence():
        argv = [str(REPO / t) if t.startswith(ASSETS) else t for t in argv]  # outputs stay relative: tmp_path
        proc = subprocess.run([sys.executable, "-m", "p3b_deploy", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, f"p3b-deploy {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    dev = tmp_path / "device"
    table = json.loads((dev / "latency_table.json").read_text())
    assert table["batch"] == 1 and table["threads"] == 1
    lat = json.loads((dev / "run" / "plan.json").read_text())["meta"]["latency"]
    assert lat["allocation"] == "knapsack"
    assert lat["pred_latency_ms"] <= lat["latency_target_ms"] + 1e-9
    assert abs(lat["latency_target_ms"] - 0.6 * lat["dense_latency_ms"]) < 1e-3
    report = json.loads((dev / "bench" / "report.json").read_text())
    rows = {(r["model"], r["batch"]): r for r in report["results"] if r["backend"] == "ort-cpu"}
    dense, slim = rows[("dense", 1)], rows[("slim", 1)]
    assert dense["params"] > slim["params"] and dense["macs"] > slim["macs"]
    assert slim["speedup"] > 1.0  # 0.6 x dense predicted; measured must at least beat dense
