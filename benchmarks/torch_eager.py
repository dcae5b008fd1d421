"""Why torch eager at batch 1 barely speeds up the slim demo model (and what SlimAttention did to it).

Dense demo model vs a slim dir of it, plus the same slim model with the q/k/v split SlimAttention
used before (three slices, three reshapes, three transposes per block instead of one reshape,
permute and unbind): timed interleaved in one process (rounds of 20 runs, order alternating),
median ms, and the aten ops per forward counted with torch.profiler.

    python benchmarks/torch_eager.py SLIM_DIR [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from p3b_deploy.artifacts import slim_dir
from p3b_deploy.models.demo import demo_checkpoint_path
from p3b_deploy.models.vit import load_model
from p3b_deploy.surgery.core import SlimAttention


def attend_sliced(self, x, attn_mask=None, is_causal=False):
    """SlimAttention.attend before it took timm's layout (fused path, q/k/v of equal width)."""
    B, N, _ = x.shape
    H, d = self.num_heads, self.qk_dim
    qkv = self.qkv(x)
    q, k, v = qkv[..., :H * d], qkv[..., H * d:2 * H * d], qkv[..., 2 * H * d:]
    q = self.q_norm(q.reshape(B, N, H, d).transpose(1, 2))
    k = self.k_norm(k.reshape(B, N, H, d).transpose(1, 2))
    v = v.reshape(B, N, H, d).transpose(1, 2)
    x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, H * d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slim_dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_model("vit_nano_patch4_16", checkpoint=str(demo_checkpoint_path())).eval()
    slim = slim_dir(args.slim_dir).load().eval()
    before = copy.deepcopy(slim)
    for m in before.modules():
        if isinstance(m, SlimAttention) and m.qk_dim == m.v_dim:
            m.attend = attend_sliced.__get__(m)
    models = {"dense": dense, "slim (sliced q/k/v)": before, "slim (timm layout)": slim}
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(slim(x), before(x), atol=1e-5)

        def timed(m, n):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                m(x)
                out.append((time.perf_counter() - t) * 1e3)
            return out
        for m in models.values():
            timed(m, 50)
        times = {k: [] for k in models}
        items = list(models.items())
        for r in range(args.rounds):
            for k, m in (items if r % 2 == 0 else items[::-1]):
                times[k] += timed(m, 20)
        from torch.profiler import ProfilerActivity, profile
        print(f"| model | median ms (batch 1, {args.threads} thread(s)) | vs dense | aten ops / forward |")
        print("|---|---:|---:|---:|")
        dense_ms = statistics.median(times["dense"])
        for k, m in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m(x)
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
            ms = statistics.median(times[k])
            print(f"| {k} | {ms:.3f} | {dense_ms / ms:.2f}x | {ops} |")


if __name__ == "__main__":
    main()
