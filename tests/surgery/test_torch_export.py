"""Slim models under torch.export with a symbolic batch dim (the path ExecuTorch and other
torch.export-based runtimes take): no op specialises the batch, the program runs at other batch
sizes and equals eager. ExecuTorch's own lowering is checked by the slow test in test_executorch.py
(it needs the separate venv of scripts/setup_edge.sh)."""
from __future__ import annotations

import pytest
import timm
import torch

from plans import random_plan, randomize_
from p3b_deploy import describe, slim

torch.set_num_threads(1)
EXAMPLE_BATCH = 2


def _static_batch_nodes(ep) -> list[str]:
    """Activations whose leading dim is the example batch as a plain int (a specialised batch)."""
    bad = []
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        shape = getattr(v, "shape", None)
        if n.op != "placeholder" and shape is not None and len(shape) >= 2 and isinstance(shape[0], int) \
                and shape[0] == EXAMPLE_BATCH:
            bad.append(f"{n.name} {n.target} {tuple(shape)}")
    return bad


@pytest.mark.parametrize("io", ["index", "scatter", "dense", "pad_in"])
def test_slim_exports_with_dynamic_batch(io: str) -> None:
    dense = randomize_(timm.create_model("vit_pico_patch4_32", depth=3), seed=0).eval()
    plan = random_plan(describe(dense), seed=5, keep=0.5, remove_prob=0.3)
    assert any(L.attn.removed or L.mlp.removed for L in plan.layers)  # identity branches on the path too
    small = slim(dense, plan, residual_io=io).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    x = torch.randn(EXAMPLE_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(small, (x,), dynamic_shapes=({0: batch},))
    assert _static_batch_nodes(ep) == []
    # ExecuTorch's to_edge pins the batch of split_with_sizes to the example's ("Attempted to resize
    # a static tensor. Expected shape (2, 64, 4, 4)" at batch 1): slim modules slice instead
    assert not [n.target for n in ep.graph.nodes if "split" in str(n.target)]
    assert _static_batch_nodes(ep.run_decompositions()) == []  # the core-ATen graph runtimes lower from
    run = ep.module()
    for b in (1, 5):
        xb = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            got, want = run(xb), small(xb)
        assert got.shape == (b, 10)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
