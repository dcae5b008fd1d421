"""Hand-made latency tables for tests (a known cost per width, no timing)."""
from __future__ import annotations

from p3b_deploy.bench.latency_table import LatencyTable


def toy_table(spec, **over) -> LatencyTable:
    """A table for `spec`: attn 0.05 + 0.01 w ms, mlp 0.02 + 0.002 w ms, fixed 0.2 ms (grid of 3 widths)."""
    hd, hid = spec.head_dim, spec.mlp_hidden
    d = {"format": "p3b-latency-table", "version": 1, "provider": "CPUExecutionProvider", "batch": 1, "threads": 1,
         "geometry": {"model": spec.name, "img_size": spec.img_size[0], "embed_dim": spec.embed_dim,
                      "depth": spec.depth, "num_heads": spec.num_heads, "head_dim": hd, "mlp_hidden": hid,
                      "num_tokens": spec.num_tokens, "num_classes": spec.num_classes},
         "branches": {"attn": {"widths": [1, hd // 2, hd], "ms": [0.05 + 0.01 * w for w in (1, hd // 2, hd)]},
                      "mlp": {"widths": [1, hid // 2, hid], "ms": [0.02 + 0.002 * w for w in (1, hid // 2, hid)]}},
         "fixed_ms": 0.2, "io_ms": {"attn": 0.01, "mlp": 0.01}, "dense_check": {}}
    d.update(over)
    return LatencyTable.from_dict(d)
