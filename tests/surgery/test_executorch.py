"""ExecuTorch (XNNPACK) lowering of a slim model with a dynamic batch: the .pte runs at batch
sizes other than the example's. Needs .venv-edge (scripts/setup_edge.sh); lowering takes minutes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EDGE_PY = ROOT / ".venv-edge" / "bin" / "python"

_LOWER = textwrap.dedent(r"""
    import sys, torch, timm
    sys.path.insert(0, sys.argv[1])
    from plans import random_plan, randomize_
    from p3b_deploy import describe, slim
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    torch.set_num_threads(1)
    dense = randomize_(timm.create_model("vit_pico_patch4_32", depth=2), seed=0).eval()
    small = slim(dense, random_plan(describe(dense), seed=5, keep=0.5, remove_prob=0.25), residual_io="index").eval()
    ep = torch.export.export(small, (torch.randn(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=16)},))
    pte = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    method = Runtime.get().load_program(pte).load_method("forward")
    for b in (2, 1, 5):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            want = small(x)
        got = method.execute([x])[0]
        print("BATCH", b, tuple(got.shape), float((got - want).abs().max()))
""")


@pytest.mark.slow
def test_slim_pte_runs_at_other_batch_sizes(tmp_path):
    if not EDGE_PY.is_file():
        pytest.skip("ExecuTorch is not installed: run `bash scripts/setup_edge.sh` (.venv-edge)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([str(EDGE_PY), "-c", _LOWER, str(ROOT / "tests")], capture_output=True, text=True,
                       env=env, timeout=1200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("BATCH")]
    assert [int(b) for _, b, *_ in rows] == [2, 1, 5]
    for _, b, *shape, diff in rows:
        assert "".join(shape) == f"({b},10)" and float(diff) <= 1e-4
