"""A removed branch is gone: no op of it in the slim model or in its ONNX graph, and surgery and
export of such plans stay exact (the knapsack latency allocation relies on both)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import timm
import torch

import p3b_deploy.models  # noqa: F401  (registers vit_pico_patch4_32)
from p3b_deploy.export import export_onnx
from p3b_deploy.models.vit import describe
from p3b_deploy.onnx_io import load_onnx_session
from p3b_deploy.plan import Plan
from p3b_deploy.surgery.core import IdentityBranch, slim
from plans import randomize_

torch.set_num_threads(1)
FAST = dict(profile_runs=1, threads=1, agreement_images=48)
REMOVED = {"attn": (1, 2), "mlp": (2,)}  # layers whose branch the plan removes (layer 2 entirely)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("io", ["index", "dense"])
def test_removed_branches_leave_no_ops(tmp_path, io):
    dense = randomize_(timm.create_model("vit_pico_patch4_32", pretrained=False, depth=4).eval(), 0)
    spec = describe(dense)
    full = Plan.dense(spec)
    cut = Plan.dense(spec)
    for kind, layers in REMOVED.items():
        for i in layers:
            getattr(cut.layers[i], kind).removed = True
    kept, gone = slim(dense, full, residual_io=io), slim(dense, cut, residual_io=io)
    n_attn, n_mlp = len(REMOVED["attn"]), len(REMOVED["mlp"])
    # the module: identity branches, no norm / Linear left in them
    for i, blk in enumerate(gone.blocks):
        for kind in ("attn", "mlp"):
            br = getattr(blk, kind)
            assert isinstance(br, IdentityBranch) == (i in REMOVED[kind])
            if i in REMOVED[kind]:
                assert not list(br.parameters()) and not list(br.children())
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert (gone(x) - kept(x)).abs().max() > 1e-2  # removing the branches visibly changes the output
    # exact: surgery verified against the masked model inside slim(); export vs torch here
    r_kept = export_onnx(kept, tmp_path / "kept.onnx", input_size=(3, 32, 32), **FAST)
    r_gone = export_onnx(gone, tmp_path / "gone.onnx", input_size=(3, 32, 32), **FAST)
    assert r_gone.parity.max_abs_diff <= 1e-4
    sess, _ = load_onnx_session(r_gone.path, threads=1)
    np.testing.assert_allclose(sess.run(["logits"], {"images": x.numpy()})[0], gone(x).detach().numpy(),
                               atol=1e-4, rtol=0)
    a, b = _ops(r_kept.path), _ops(r_gone.path)
    # one LayerNorm per live branch (+ the final norm), one Softmax per live attention, 4 matmuls per
    # attention (qkv, q@k, attn@v, proj) and 2 per MLP: the removed ones are gone, nothing else changes
    assert b["LayerNormalization"] == a["LayerNormalization"] - n_attn - n_mlp == 2 * 4 + 1 - n_attn - n_mlp
    assert b["Softmax"] == a["Softmax"] - n_attn == 4 - n_attn
    mm = lambda c: c["MatMul"] + c["Gemm"]  # noqa: E731
    assert mm(b) == mm(a) - 4 * n_attn - 2 * n_mlp
    assert sum(b.values()) < sum(a.values())
