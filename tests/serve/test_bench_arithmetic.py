"""The served-throughput arithmetic of `bench_server`, with a stub transport and a fake clock (fast):
images = requests x batch, throughput = images / wall seconds, percentiles, the server's batch,
dense/slim turns. Every cost is a power-of-two fraction of a second, so the sums are exact."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from p3b_deploy.serve.client import ModelInfo, bench_server, level_row


class StubTransport:
    """A server whose requests take `cost[model]` seconds of a fake clock; it runs one execution
    per two requests (as a dynamic batcher pairing them would)."""

    def __init__(self, cost: dict[str, float], macs: dict[str, int]):
        self.cost, self.macs = cost, macs
        self.t = 0.0
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.counts = {m: [0, 0] for m in cost}  # inference_count (images), execution_count
        self.closed = False

    def clock(self) -> float:
        return self.t

    def model_info(self, name: str) -> ModelInfo:
        return ModelInfo(name, "images", "logits", (3, 4, 4), 8, {"macs": str(self.macs[name])})

    def requester(self, info, x, timeout_s):
        def send() -> None:
            with self.lock:
                k = len([c for c in self.calls if c == info.name])
                self.calls.append(info.name)
                self.t += self.cost[info.name]
                self.counts[info.name][0] += x.shape[0]
                self.counts[info.name][1] += k % 2 == 0
        return send

    def statistics(self, name: str) -> dict:
        return {"inference_count": self.counts[name][0], "execution_count": self.counts[name][1]}

    def server_info(self) -> dict:
        return {"address": "stub"}

    def close(self) -> None:
        self.closed = True


def _bench(stub, **kw):
    opts = dict(concurrency=(1,), batch=4, max_requests=40, max_seconds=100.0, round_seconds=0.25, warmup_requests=2)
    return bench_server("127.0.0.1:1", ["dense", "slim"], transport=stub, **{**opts, **kw})


def test_throughput_at_batch_4_is_requests_times_batch_over_time():
    stub = StubTransport({"dense": 1 / 32, "slim": 1 / 64}, {"dense": 1000, "slim": 400})
    rep = _bench(stub)
    rows = {r["model"]: r for r in rep.results}
    d, s = rows["dense"], rows["slim"]
    assert (d["requests"], d["images"], d["timed_s"]) == (40, 160, 40 / 32)
    assert (s["requests"], s["images"], s["timed_s"]) == (40, 160, 40 / 64)
    assert d["throughput"] == 128.0 and s["throughput"] == 256.0  # 160 images in 1.25 s and 0.625 s
    assert d["median_ms"] == d["p99_ms"] == 31.25 and s["p90_ms"] == 15.625
    assert d["server_batch"] == 8.0  # 160 images in 20 executions
    assert s["speedup"] == 2.0 and s["mac_reduction"] == 2.5 and s["speedup_efficiency"] == 0.8
    assert stub.closed
    # turns of 0.25 s: dense 8 requests, slim 16; order alternates every round (A B, B A, A B ...)
    runs, last = [], None
    for c in stub.calls:
        if c == last:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
            last = c
    assert runs == [["dense", 2], ["slim", 2],  # warm-up
                    ["dense", 8], ["slim", 32], ["dense", 16], ["slim", 8], ["dense", 16]]


def test_concurrency_4_counts_every_request_once():
    stub = StubTransport({"dense": 1 / 16, "slim": 1 / 32}, {"dense": 1000, "slim": 500})
    rep = _bench(stub, concurrency=(4,), batch=2, round_seconds=1000.0, max_requests=37, warmup_requests=1)
    rows = {r["model"]: r for r in rep.results}
    for m, cost in (("dense", 1 / 16), ("slim", 1 / 32)):
        r = rows[m]
        assert r["requests"] == 37 and r["images"] == 74 and r["concurrency"] == 4
        assert r["timed_s"] == 37 * cost and r["throughput"] == 2 / cost  # one clock: wall = sum of costs
    assert stub.calls.count("dense") == 4 + 37  # warm-up: 1 per client thread
    assert rows["slim"]["speedup"] == 2.0


def test_level_row_percentiles_are_exact():
    info = ModelInfo("m", "images", "logits", (3, 4, 4), 8, {"macs": "7", "params": "3"})
    r = level_row(info, [float(v) for v in range(1, 101)], wall_s=2.0, batch=4, concurrency=16,
                  counts0=(10, 5), counts1=(410, 105))
    assert (r["requests"], r["images"], r["throughput"]) == (100, 400, 200.0)
    assert r["median_ms"] == 50.5 and r["p90_ms"] == pytest.approx(90.1, abs=1e-12)
    assert r["p99_ms"] == pytest.approx(99.01, abs=1e-12) and r["min_ms"] == 1.0
    assert r["server_batch"] == 4.0 and (r["macs"], r["params"]) == (7, 3)
    assert level_row(info, [5.0], 0.5, 1, 1, (0, 0), (1, 0))["server_batch"] is None  # no execution counted
    assert np.isclose(r["mean_ms"], 50.5)
