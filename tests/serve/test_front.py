"""The HTTP front's request checks, its client deadlines and connection cap (against a fake
upstream on loopback), the supervisor's death reasons and restart policy, without a server (fast).
The same checks against the real tritonserver (and the crashes they prevent) are in test_serve.py."""
from __future__ import annotations

import json
import threading
import time

import pytest

from p3b_deploy.errors import ServeError
from p3b_deploy.serve.front import InputSpec, Rejected, check_infer, input_specs, parse_json_part
from p3b_deploy.serve.server import exit_reason, last_log_line

SPECS = {"images": InputSpec(dims=(3, 16, 16), max_batch_size=8)}
LIMIT = 64 << 20


def _req(shape, name="images", dtype="FP32", **extra):
    return {"inputs": [{"name": name, "shape": shape, "datatype": dtype, **extra}]}


def _rejected(fn, *args) -> tuple[int, str]:
    with pytest.raises(Rejected) as e:
        fn(*args)
    return e.value.status, str(e.value)


def test_shapes_that_fit_the_config_pass():
    for b in (1, 5, 8):
        check_infer(_req([b, 3, 16, 16]), "slim", SPECS, LIMIT)
    check_infer(_req([2, 7], name="other"), "slim", SPECS, LIMIT)  # unknown input: Triton answers it
    # -1 dims take any size; a model without batch axis takes exactly its dims
    check_infer(_req([4, 99]), "m", {"images": InputSpec((-1,), 4)}, LIMIT)
    check_infer(_req([3, 16, 16]), "m", {"images": InputSpec((3, 16, 16), 0)}, LIMIT)


def test_request_of_death_shape_and_other_bad_shapes_rejected():
    status, why = _rejected(check_infer, _req([2147483647, 1, 16, 16]), "slim", SPECS, LIMIT)
    assert status == 400 and why == ("input 'images' of model 'slim' has shape [2147483647, 1, 16, 16], "
                                     "the model takes [1..8, 3, 16, 16]")
    for shape in ([9, 3, 16, 16], [0, 3, 16, 16], [2, 3, 16], [2, 3, 16, 17], [2, 1, 3, 16, 16]):
        assert _rejected(check_infer, _req(shape), "slim", SPECS, LIMIT)[0] == 400, shape
    for shape in ([-1, 3], [2**31, 1], [1.5, 2], [True], "2,3", [1] * 17):
        status, why = _rejected(check_infer, _req(shape, name="x"), "slim", SPECS, LIMIT)
        assert status == 400 and "shape must be a list of at most 16 integers" in why, shape
    # an unknown input may not declare more bytes than the body limit: 2**28 INT64 = 2 GiB
    status, why = _rejected(check_infer, _req([2**28], name="x", dtype="INT64"), "slim", SPECS, LIMIT)
    assert why == f"input 'x' declares {2**31} bytes, above the limit of {LIMIT}"
    for doc in ([], {"inputs": []}, {"inputs": "x"}, {"inputs": [3]}, {"inputs": [{"shape": [1]}]}, None):
        assert _rejected(check_infer, doc, "slim", SPECS, LIMIT)[0] == 400, doc


def test_json_part_depth_and_header_length():
    assert parse_json_part(b'{"a": [[1]]}', None, 3) == {"a": [[1]]}
    assert _rejected(parse_json_part, b'{"a": [[[1]]]}', None, 3) == (400, "request JSON nests deeper than 3 levels")
    # 8 MB of '[' crashes tritonserver's recursive parser; here it is a 400 in a few ms
    assert _rejected(parse_json_part, b"[" * (8 << 20), None, 32) == (400, "request JSON nests deeper than 32 levels")
    status, why = _rejected(parse_json_part, b"\x00\x01 binary", None, 32)
    assert status == 400 and why.startswith("request body is not valid JSON")
    head = json.dumps(_req([1, 3, 16, 16], parameters={"binary_data_size": 4})).encode()
    body = head + b"\x00\x01\x02\x03"
    assert parse_json_part(body, str(len(head)), 32)["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert _rejected(parse_json_part, body, str(len(body) + 1), 32)[0] == 400
    assert _rejected(parse_json_part, body, "12x", 32)[0] == 400
    assert parse_json_part(b"  ", None, 32) is None  # an empty POST (e.g. repository index) passes


def test_input_specs_from_served_config():
    cfg = {"max_batch_size": 16, "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": ["3", "224", "224"]}]}
    assert input_specs(cfg) == {"images": InputSpec((3, 224, 224), 16)}


def test_death_reasons():
    assert exit_reason(-11) == "killed by signal 11 (SIGSEGV)" and exit_reason(-6) == "killed by signal 6 (SIGABRT)"
    assert exit_reason(1) == "exit code 1" and exit_reason(None) == "still running"
    log = ("I1202 grpc_server.cc] \"Started GRPCInferenceService\"\n"
           "terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
           "Signal (6) received.\n 0# 0x000055 in tritonserver\n 1# 0x7F in /lib/libc.so.6\n\n")
    assert last_log_line(log) == "Signal (6) received."
    assert last_log_line("+----+\n| a |\n+----+\n") is None and last_log_line("") is None


# ------------------------------------------------------------------------------ the config sweep (no server)
def test_sweep_grid_and_config_overrides(tmp_path):
    from p3b_deploy.errors import ServeError
    from p3b_deploy.export.triton import config_from_onnx, write_triton_repo
    from p3b_deploy.serve.tune import parse_sweep, settings_of, with_settings, write_back
    from onnx_models import tiny_image_onnx
    assert parse_sweep(["instances=1,2", "threads=1,2,1"]) == {"instances": (1, 2), "threads": (1, 2)}
    assert parse_sweep(["threads=0,4"]) == {"instances": (None,), "threads": (0, 4)}
    for bad, msg in ((["instances=0"], "integers in 1..64"), (["threads=x"], "integers in 0..64"),
                     (["cores=2"], "--sweep takes"), (["instances=1", "instances=2"], "given twice"), ([], "needs")):
        with pytest.raises(ServeError, match=msg):
            parse_sweep(bad)
    served = {"name": "m", "backend": "python", "instance_group": [{"name": "m_0", "kind": "KIND_CPU", "count": 1}],
              "parameters": {"intra_op_threads": {"string_value": "0"}, "macs": {"string_value": "7"}}}
    new = with_settings(served, 2, 3)
    assert settings_of(new) == {"instances": 2, "threads": 3} and settings_of(served) == {"instances": 1, "threads": 0}
    assert new["parameters"]["macs"] == {"string_value": "7"} and served["instance_group"][0]["count"] == 1
    ort = with_settings({"name": "p", "backend": "onnxruntime"}, 4, 2)  # the production flavour's parameter
    assert ort["instance_group"] == [{"kind": "KIND_CPU", "count": 4}]
    assert ort["parameters"] == {"intra_op_thread_count": {"string_value": "2"}}
    src = tiny_image_onnx(tmp_path / "m.onnx")
    write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "m", backend="python", instance_count=1))
    path = write_back(tmp_path / "repo", "m", 2, 1)
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert [g.count for g in cfg.instance_group] == [2] and cfg.parameters["intra_op_threads"].string_value == "1"
    assert list(cfg.input[0].dims) == [3, 4, 4] and cfg.max_batch_size == 32  # the rest as it was
    with pytest.raises(ServeError, match="--write-back takes the repository folder"):
        write_back(tmp_path, "m", 2, 1)


def test_sweep_passes_average_and_the_best_respects_the_p99_bound():
    from p3b_deploy.serve.tune import aggregate_passes, pick_best

    def r(thr, p99, batch=4.0):
        return {"throughput": thr, "p99_ms": p99, "median_ms": p99 / 2, "server_batch": batch, "requests": 10, "macs": 5}
    raw = {("slim", 1, 1, 16): [r(10.0, 900.0), r(12.0, 1100.0)],  # mean 11, worst p99 1100
           ("slim", 2, 1, 16): [r(14.0, 2500.0), r(13.0, 1500.0)],  # mean 13.5, over a 2000 ms bound
           ("slim", 2, 2, 16): [r(9.0, 800.0), r(8.0, 700.0)],
           ("slim", 1, 1, 1): [r(50.0, 10.0), r(50.0, 10.0)]}  # another level: not where the choice is made
    rows = aggregate_passes(raw, 2000.0)
    by = {(x["instances"], x["threads"], x["concurrency"]): x for x in rows}
    assert by[(1, 1, 16)]["throughput"] == 11.0 and by[(1, 1, 16)]["p99_ms"] == 1100.0
    assert by[(1, 1, 16)]["throughput_passes"] == [10.0, 12.0] and by[(1, 1, 16)]["requests"] == 20
    assert by[(2, 1, 16)]["within_bound"] is False and by[(2, 2, 16)]["within_bound"] is True
    best = pick_best(rows, ["slim"], 16)["slim"]
    assert (best["instances"], best["threads"], best["throughput"]) == (1, 1, 11.0)
    assert pick_best(aggregate_passes(raw, None), ["slim"], 16)["slim"]["instances"] == 2  # no bound: 13.5 wins
    assert pick_best(aggregate_passes(raw, 100.0), ["slim"], 16)["slim"] is None  # nothing within 100 ms


# ------------------------------------------------------------------------------ the restart policy (fake clock)
def test_restart_policy_doubles_caps_resets_and_gives_up():
    from p3b_deploy.serve.server import RestartPolicy
    p = RestartPolicy(max_restarts=5, backoff_s=1.0, max_backoff_s=5.0, stable_s=60.0)
    assert [p.next_delay(0.5) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]  # doubling, capped at 5
    assert p.next_delay(59.9) is None and p.streak == 5  # 5 in a row: give up
    assert p.next_delay(60.0) == 1.0 and p.streak == 1  # a stable uptime starts a new streak
    assert RestartPolicy(max_restarts=0).next_delay(1e9) is None  # 0 = never restart
    for bad in (dict(max_restarts=-1), dict(backoff_s=-1.0), dict(backoff_s=2.0, max_backoff_s=1.0)):
        with pytest.raises(ServeError, match="max backoff >= backoff"):
            RestartPolicy(**bad)


class _FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _FakeProc:
    """A server process that 'runs' `uptime` seconds of the fake clock, then dies of SIGSEGV."""
    pids = iter(range(100, 200))

    def __init__(self, clock: _FakeClock, uptime: float):
        self.clock, self.uptime, self.pid, self.returncode = clock, uptime, next(self.pids), None

    def wait(self, timeout=None) -> int:
        if self.returncode is None:
            self.clock.now += self.uptime
            self.returncode = -11
        return self.returncode

    def poll(self):
        return self.returncode


class _FakeStop:
    """The supervisor's stop event: its backoff pause advances the fake clock instead of sleeping."""

    def __init__(self, clock: _FakeClock):
        self.clock, self.pauses = clock, []

    def is_set(self) -> bool:
        return False

    def wait(self, seconds: float) -> bool:
        self.pauses.append(seconds)
        self.clock.now += seconds
        return False


def test_supervisor_follows_the_policy_with_a_fake_clock(tmp_path):
    """The real supervisor loop, with processes that die after scripted uptimes of a fake clock: a
    restart that fails counts in the streak, 61 s of uptime resets it, the fifth in a row gives up."""
    from p3b_deploy.serve.server import TritonServer

    clock = _FakeClock()
    script = [2.0, 3.0, "fail", 61.0, 0.1, 1.0, 1.0, 1.0, 1.0]  # what each restart does: run that long, or fail
    (tmp_path / "s.log").write_text("Signal (11) received.\n")

    class Scripted(TritonServer):
        def _launch(self):
            step = script.pop(0)
            if step == "fail":
                raise ServeError("models not ready after 120s: m")
            self._started_at = self._clock()
            self.process = _FakeProc(clock, step)

        def _end(self, proc, lifeline, timeout=20.0):
            return proc.returncode

    s = Scripted(tmp_path, restart=True, max_restarts=5, backoff_s=1.0, max_backoff_s=5.0, stable_s=60.0,
                 front=False, log_path=tmp_path / "s.log")
    s._clock, s._stopping = clock, _FakeStop(clock)
    s._started_at, s.process = clock(), _FakeProc(clock, 0.5)
    s._supervise()
    # deaths after 0.5, 2, 3 s, a failed restart, 61 s (new streak), 0.1, 1, 1, 1 s
    assert s._stopping.pauses == [1.0, 2.0, 4.0, 5.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert s.restarts == 8 and len(s.deaths) == 10 and not script
    assert s.events[0] == ("tritonserver died (killed by signal 11 (SIGSEGV); last log line: Signal (11) received.); "
                           "restart 1/5 in 1.0s")
    assert s.events[1].startswith("tritonserver restarted (pid 1")
    assert "died (restart failed: models not ready after 120s: m); restart 4/5 in 5.0s" in s.events[5]
    assert s.events[-1].endswith("giving up after 5 restart(s) in a row") and s.gave_up is not None


# ------------------------------------------------------------------------------ the front on loopback (fake upstream)
class _FakeTriton:
    """A stdlib HTTP server on loopback that answers like tritonserver for one model 'm'."""

    CONFIG = {"name": "m", "max_batch_size": 8, "input": [{"name": "images", "data_type": "TYPE_FP32",
                                                           "dims": [3, 4, 4]}]}

    def __init__(self):
        import http.server

        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status: int, doc) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                if self.path == "/v2/models/m/config":
                    return self._reply(200, owner.CONFIG)
                self._reply(200 if self.path == "/v2/health/ready" else 404, {})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self._reply(200, {"model_name": "m", "outputs": [{"name": "logits", "shape": [1, 2],
                                                                   "datatype": "FP32", "data": [0.5, -0.5]}]})

        import http.server as hs
        self.httpd = hs.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


INFER = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 4, 4], "datatype": "FP32",
                                "data": [0.0] * 48}]}).encode()


@pytest.fixture
def upstream():
    fake = _FakeTriton()
    yield fake
    fake.close()


def _front(upstream, **limits):
    from p3b_deploy.serve.front import FrontConfig, HttpFront
    return HttpFront(upstream.port, 0, FrontConfig(**limits)).start()


def _raw(port: int, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data` on a fresh connection, read until the server closes it: (answer, seconds)."""
    import socket
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return out, time.monotonic() - t0
            out += chunk


def test_front_config_flags_and_validation():
    from p3b_deploy.cli import build_parser
    from p3b_deploy.cli.serve import front_config
    from p3b_deploy.serve.front import FrontConfig
    args = build_parser().parse_args(["serve", "repo", "--header-timeout-s", "3", "--max-connections", "10",
                                      "--max-body-mb", "2"])
    assert front_config(args) == FrontConfig(max_body_mb=2.0, header_timeout_s=3.0, max_connections=10)
    assert front_config(build_parser().parse_args(["serve", "repo"])) == FrontConfig()
    d = FrontConfig()
    assert (d.header_timeout_s, d.body_timeout_s, d.idle_timeout_s, d.max_connections) == (10.0, 30.0, 60.0, 256)
    with pytest.raises(ServeError, match="front body timeout s must be > 0, got 0"):
        FrontConfig(body_timeout_s=0).validate()
    with pytest.raises(ServeError, match="max connections must be in 1..10000"):
        FrontConfig(max_connections=0).validate()


def test_deadlines_for_head_body_and_idle(upstream):
    import socket
    front = _front(upstream, header_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.5)
    try:
        # a whole request in one go: forwarded
        answer, _ = _raw(front.port, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
        # a head trickled a line every 0.3 s: every read is quick, the whole head is not -> 408 at ~1 s
        with socket.create_connection(("127.0.0.1", front.port), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\n")
            answer = b""
            for _ in range(20):
                time.sleep(0.3)
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
            while chunk := s.recv(4096):
                answer += chunk
            took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert answer.endswith(b'{"error": "request head not received within 1 s"}') and 1.0 <= took < 2.5, took
        # a body that stops short: 408 at ~1 s after the head
        answer, took = _raw(front.port, b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", 5)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 1 s" in answer
        assert 1.0 <= took < 2.0, took
        # connected, nothing sent: closed at the head deadline without an answer
        assert _raw(front.port, b"", 5)[0] == b""
        # kept alive after a request: closed silently after 1.5 s of silence, not at the 1 s head deadline
        with socket.create_connection(("127.0.0.1", front.port), timeout=5) as s:
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b"\r\n\r\n{}"):  # the whole answer (upstream's body is {})
                first += s.recv(4096)
            t0 = time.monotonic()
            assert s.recv(4096) == b"" and 1.4 <= time.monotonic() - t0 < 2.5
        assert first.startswith(b"HTTP/1.1 200 ")
        assert front.counts["timed_out"] == 3 and front.counts["forwarded"] == 2
    finally:
        front.stop()


def test_connection_cap_answers_503_and_frees_up(upstream):
    import socket
    front = _front(upstream, max_connections=3, header_timeout_s=1.0)
    try:
        held = [socket.create_connection(("127.0.0.1", front.port), timeout=5) for _ in range(3)]
        time.sleep(0.2)
        assert front.open_connections == 3
        t0 = time.monotonic()
        answer, took = _raw(front.port, b"GET /v2/health/ready HTTP/1.1\r\n\r\n", 5)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and took < 0.5, (answer, took)
        assert b"too many connections (at most 3); retry shortly" in answer and front.refused == 1
        for s in held:  # the held ones end at their head deadline; then there is room again
            assert s.recv(10) == b""
            s.close()
        assert time.monotonic() - t0 < 2.0
        from slow_clients import settle
        assert settle(lambda: front.open_connections, 0, 2.0) == 0
        answer, _ = _raw(front.port, b"GET /v2/health/ready HTTP/1.1\r\nConnection: close\r\n\r\n", 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        front.stop()


def test_slow_client_storm_is_cut_off_while_normal_requests_succeed(upstream):
    """200 clients trickling a header line every 0.5 s and 50 trickling a 1 MB body, against 2 s
    deadlines: all closed with a 408 within 2 + 5 s, every normal request meanwhile (GET and an
    infer POST on fresh connections) answered 200, and the thread count back to idle after."""
    from slow_clients import normal_requests, settle, storm
    front = _front(upstream, header_timeout_s=2.0, body_timeout_s=2.0, idle_timeout_s=2.0, max_connections=300)
    try:
        idle = threading.active_count()
        stop, statuses = threading.Event(), []
        workers = [threading.Thread(target=normal_requests, args=(front.port, stop, statuses)),
                   threading.Thread(target=normal_requests, args=(front.port, stop, statuses, INFER,
                                                                  "/v2/models/m/infer"))]
        for w in workers:
            w.start()
        try:
            result = storm(front.port, heads=200, bodies=50, trickle_s=0.5, limit_s=2.0 + 5.0 + 3.0)
            stop.wait(0.5)
        finally:
            stop.set()
            for w in workers:
                w.join(15)
        assert result.open_at_end == 0
        heads, bodies = result.lifetimes("head"), result.lifetimes("body")
        assert len(heads) == 200 and len(bodies) == 50
        assert 1.95 <= min(heads) and max(heads) <= 7.0 and 1.95 <= min(bodies) and max(bodies) <= 7.0, \
            (min(heads), max(heads), min(bodies), max(bodies))
        assert all(c.answer.startswith(b"HTTP/1.1 408 ") for c in result.clients)
        assert len(statuses) >= 10 and all(isinstance(r, tuple) and r[0] == 200 for r in statuses), statuses
        assert sum(b'"data": [0.5, -0.5]' in r[1] for r in statuses) >= 5  # infer answers passed back
        assert front.counts["timed_out"] == 250 and front.refused == 0
        assert settle(threading.active_count, idle, 5.0) == idle and front.open_connections == 0
    finally:
        front.stop()
