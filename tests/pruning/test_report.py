"""keep_ratio.png's x axis: every label readable (no two touch), however many mask updates."""
from __future__ import annotations

import pytest

from p3b_deploy.pruning.report import keep_ratio_figure, plot_keep_ratio

NAMES = [f"{k}{i}" for i in range(12) for k in ("attn", "mlp")]


def _updates(n: int) -> list[dict]:
    return [{"epoch": 0.25 + 0.0731 * u, "kr_goal": [0.5] * 24, "kr_applied": [0.5] * 24, "removed": [3],
             "pred_latency_ms": 0.788 - 0.4 * u / n, "dense_latency_ms": 0.788, "latency_target_ms": 0.394}
            for u in range(n)]


@pytest.mark.parametrize("n", [3, 9, 14, 150])
def test_tick_labels_never_touch(n):
    import matplotlib.pyplot as plt
    ups = _updates(n)
    fig = keep_ratio_figure(ups, NAMES)
    try:
        fig.canvas.draw()
        assert fig.get_size_inches()[0] <= 14  # a long run does not make a poster-wide picture
        for ax in fig.axes[:2]:
            labels = ax.get_xticklabels()
            boxes = [t.get_window_extent() for t in labels]
            assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
            ticks = [int(t) for t in ax.get_xticks()]
            step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
            assert ticks == list(range(0, n, step))
            # each label: the update's epoch and its predicted ms (the unit is on the axis label)
            assert labels[1].get_text() == f"{ups[step]['epoch']:.2f}\n{ups[step]['pred_latency_ms']:.3g}"
            assert ax.get_xlabel() == "mask update: epoch / predicted ms"
            if n <= 9:
                assert step == 1  # few updates: every one labelled
            assert len(ticks) >= min(n, 5)  # many updates: still a readable scale
    finally:
        plt.close(fig)


def test_png_written(tmp_path):
    assert plot_keep_ratio(tmp_path / "k.png", [], NAMES) is None
    path = plot_keep_ratio(tmp_path / "k.png", _updates(12), NAMES)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
