"""A loopback HTTP front for tritonserver: every request is checked before Triton parses it.

Why: two HTTP requests kill tritonserver 2.51 outright (upstream triton-inference-server/server#5840):
- an infer request whose JSON declares a huge shape, e.g. [2147483647, 1, 16, 16]: the server
  allocates for it before checking it against the model and dies of std::bad_alloc (signal 6);
- a body of deeply nested JSON (8 MB of `[`): its recursive JSON parser overflows the stack
  (signal 11), whatever the Content-Type.
Triton 2.51 has no option that bounds either (no --http-max-input-size, no nesting limit), so
Triton's own HTTP listens on an internal loopback port and clients talk to this front, which
refuses, with a 4xx and Triton's `{"error": ...}` body:
- a body without Content-Length (411), above `max_body_bytes` (413), or compressed (415: Triton
  would inflate it first);
- a JSON part (the whole body, or its first Inference-Header-Content-Length bytes) that does not
  parse, nests deeper than `max_depth`, or is not an object (400);
- an infer request whose inputs declare a shape that does not fit the model's config (rank,
  per-image dims, 1..max_batch_size images), or whose bytes exceed the body limit (400).
Everything else is forwarded as it came (keep-alive on both sides) and Triton's answer is passed
back; while the server is down (e.g. being restarted) the front answers 503.

Slow and numerous clients (`FrontConfig`): a client has `header_timeout_s` for a whole request
head (a new connection's count starts at connect, a kept-alive one's at its next request's first
byte), `body_timeout_s` for the whole body after it, and a kept-alive connection may stay silent
`idle_timeout_s` between requests. These are deadlines, not per-read timeouts: every read waits at
most the time left, so a client that trickles a byte a second is cut off all the same. A client
past its deadline gets 408 (nothing if it sent nothing) and its connection and thread end. At most
`max_connections` connections are open at once (one thread each); the next one gets 503 at once
and is closed.
gRPC is not behind the front: the same requests over gRPC are refused by Triton itself
(checked in tests/serve/test_serve.py).
"""
from __future__ import annotations

import http.client
import io
import json
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from ..configs import ConfigBase, opt
from ..errors import ServeError

LOOPBACK = "127.0.0.1"
_INFER = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer$")
# bytes per element; BYTES elements are at least 4 bytes (length prefix)
DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
               "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length"}
MAX_DIM = 2**31 - 1
DRAIN_BYTES = 1 << 30  # a too-large body up to this size is read (and dropped) before the 413


@dataclass(frozen=True)
class FrontConfig(ConfigBase):
    """Limits of the HTTP front (the `serve` flags; `TritonServer(front=FrontConfig(...))`)."""
    max_body_mb: float = opt(64.0, "largest HTTP request body the front forwards to the server, in MB", metavar="MB")
    header_timeout_s: float = opt(10.0, "seconds a client has to send a whole request head (request line + headers; "
                                        "counted from connect, or from a kept-alive request's first byte)", metavar="S")
    body_timeout_s: float = opt(30.0, "seconds a client has to send a whole request body after its head (also "
                                      "bounds sending the answer)", metavar="S")
    idle_timeout_s: float = opt(60.0, "seconds a kept-alive HTTP connection may stay silent between requests",
                                metavar="S")
    max_connections: int = opt(256, "open HTTP connections at most (one thread each); the next one gets 503 and "
                                    "is closed", metavar="N")
    max_depth: int = opt(32, "deepest JSON nesting forwarded", cli=False)
    upstream_timeout_s: float = opt(120.0, "seconds to wait for tritonserver's answer", cli=False)

    def validate(self) -> "FrontConfig":
        for name in ("max_body_mb", "header_timeout_s", "body_timeout_s", "idle_timeout_s", "upstream_timeout_s"):
            if not getattr(self, name) > 0:
                raise ServeError(f"front {name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.max_connections <= 10000 or self.max_depth < 1:
            raise ServeError(f"front max connections must be in 1..10000 (got {self.max_connections}), "
                             f"max depth >= 1 (got {self.max_depth})")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


class DeadlineExpired(Exception):
    """The client did not send its request head (or body) in time, or stayed idle too long."""

    def __init__(self, phase: str, seconds: float):
        super().__init__(f"request {phase} not received within {seconds:g} s" if phase != "idle"
                         else f"connection idle for {seconds:g} s")
        self.phase = phase


class _DeadlineReader(io.RawIOBase):
    """The client socket, read under the deadline of the current phase (idle, head or body): each
    recv waits at most the time left, so slowly trickled bytes cannot stretch it. The first byte
    after an idle keep-alive pause starts the head's deadline."""

    def __init__(self, sock: socket.socket, config: FrontConfig, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.sock, self.clock = sock, clock
        self.seconds = {"idle": config.idle_timeout_s, "head": config.header_timeout_s, "body": config.body_timeout_s}
        self.received = False  # bytes of the current request came in
        self.expect("head")

    def expect(self, phase: str) -> None:
        self.phase, self.deadline = phase, self.clock() + self.seconds[phase]
        if phase != "body":
            self.received = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            left = self.deadline - self.clock()
            if left <= 0:
                raise DeadlineExpired(self.phase, self.seconds[self.phase])
            self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(buf)
            except (TimeoutError, InterruptedError):
                continue
            if n:
                if self.phase == "idle":
                    self.expect("head")
                self.received = True
            return n


class _Writer(io.BufferedIOBase):
    """The client socket's write side: each answer is sent within `seconds` (socket.sendall's
    timeout bounds the whole call), so a client that does not read cannot hold the thread."""

    def __init__(self, sock: socket.socket, seconds: float):
        super().__init__()
        self.sock, self.seconds = sock, seconds

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sock.settimeout(self.seconds)
        self.sock.sendall(b)
        return len(b)


def _answer_raw(sock: socket.socket, status: int, reason: str, timeout: float) -> None:
    """A whole error answer written straight to the socket, with Connection: close (no parsed
    request needed); a client that is gone is ignored."""
    body = json.dumps({"error": reason}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: p3b-front\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    try:
        sock.settimeout(timeout)
        sock.sendall(head.encode() + body)
    except OSError:
        pass


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections: beyond it, a new connection gets 503
    from the accepting thread and is closed, without a thread of its own."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, max_connections: int):
        self.max_connections = max_connections
        self.request_queue_size = min(max(max_connections, 16), 1024)  # listen backlog
        self.open_connections = self.refused = 0
        self._open_lock = threading.Lock()
        super().__init__(address, handler, bind_and_activate=False)

    def process_request(self, request, client_address):
        with self._open_lock:
            full = self.open_connections >= self.max_connections
            if full:
                self.refused += 1
            else:
                self.open_connections += 1
        if full:
            try:  # what the client already sent is read, so that closing does not reset our answer away
                request.setblocking(False)
                request.recv(1 << 16)
            except OSError:
                pass
            _answer_raw(request, 503, f"too many connections (at most {self.max_connections}); retry shortly", 0.5)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self) -> None:
        with self._open_lock:
            self.open_connections -= 1

    def handle_error(self, request, client_address):  # a client that vanished mid-request: not our error
        pass


class Rejected(Exception):
    """A request the front will not forward: HTTP status and one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What a model accepts on one input (from its served config)."""
    dims: tuple[int, ...]  # per-request dims without the batch axis (-1 = any size)
    max_batch_size: int  # 0 = no batch axis


def input_specs(config: dict[str, Any]) -> dict[str, InputSpec]:
    """{input name: InputSpec} from a model config as Triton returns it over HTTP (JSON)."""
    mbs = int(config.get("max_batch_size", 0) or 0)
    return {i["name"]: InputSpec(tuple(int(d) for d in i.get("dims", [])), mbs) for i in config.get("input", [])}


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (iterative), stopping once it exceeds `limit`."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json_part(body: bytes, header_length: str | None, max_depth: int) -> Any:
    """The request's JSON part, parsed and depth-checked; Rejected(400) if it is not acceptable."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise Rejected(400, f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}") from None
        if not 0 <= n <= len(body):
            raise Rejected(400, f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        body = body[:n]
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except RecursionError:
        raise Rejected(400, f"request JSON nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected(400, f"request body is not valid JSON: {str(e).splitlines()[0][:120]}") from None
    if _depth(doc, max_depth) > max_depth:
        raise Rejected(400, f"request JSON nests deeper than {max_depth} levels")
    return doc


def check_infer(doc: Any, model: str, specs: dict[str, InputSpec], max_bytes: int) -> None:
    """Rejected(400) unless every declared input shape is sane and fits `model`'s config."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise Rejected(400, "infer request JSON must be an object with a non-empty 'inputs' list")
    total = 0
    for inp in doc["inputs"]:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise Rejected(400, "every input must be an object with a 'name'")
        name, shape, dtype = inp["name"], inp.get("shape"), inp.get("datatype")
        if not isinstance(shape, list) or len(shape) > 16 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
            raise Rejected(400, f"input '{name}': shape must be a list of at most 16 integers in 0..{MAX_DIM}")
        spec = specs.get(name)
        if spec is not None:
            expect = ([spec.max_batch_size] if spec.max_batch_size else []) + list(spec.dims)
            ok = len(shape) == len(expect) and all(e < 0 or d == e for d, e in zip(shape[-len(spec.dims):] if spec.dims else [], spec.dims))
            if spec.max_batch_size and ok:
                ok = 1 <= shape[0] <= spec.max_batch_size
            if not ok:
                batch = f"[1..{spec.max_batch_size}, " if spec.max_batch_size else "["
                raise Rejected(400, f"input '{name}' of model '{model}' has shape {shape[:8]}, the model takes "
                                    f"{batch}{', '.join(str(d) for d in spec.dims)}]")
        total += math.prod(shape) * DTYPE_BYTES.get(dtype, 8)
        if total > max_bytes:
            raise Rejected(400, f"input '{name}' declares {total} bytes, above the limit of {max_bytes}")


class HttpFront:
    """Checks HTTP requests for a tritonserver listening on `upstream_port`, forwards the good ones.

        front = HttpFront(upstream_port=8100, port=8000).start()   # clients use 127.0.0.1:8000
        ...
        front.stop()

    `config` sets the limits (body size, client deadlines, open connections); `counts` says how
    many requests were forwarded, rejected, answered 503 (server down), timed out.
    """

    def __init__(self, upstream_port: int, port: int = 0, config: FrontConfig | None = None):
        self.upstream_port = upstream_port
        self.requested_port = port
        self.config = (config or FrontConfig()).validate()
        self.max_body_bytes = self.config.max_body_bytes
        self.max_depth = self.config.max_depth
        self.counts = {"forwarded": 0, "rejected": 0, "unavailable": 0, "timed_out": 0}
        self._configs: dict[str, dict[str, InputSpec]] = {}
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else 0

    @property
    def open_connections(self) -> int:
        return self._httpd.open_connections if self._httpd else 0

    @property
    def refused(self) -> int:
        """Connections answered 503 because `max_connections` were open."""
        return self._httpd.refused if self._httpd else 0

    def start(self) -> "HttpFront":
        front = self

        class Handler(_FrontHandler):
            owner = front

        httpd = _Server((LOOPBACK, self.requested_port), Handler, self.config.max_connections)
        try:
            httpd.server_bind()
            httpd.server_activate()
        except OSError:
            httpd.server_close()
            raise
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"http-front:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def forget_configs(self) -> None:
        """Drop cached model configs (after the server restarted or models were reloaded)."""
        with self._lock:
            self._configs.clear()

    def specs(self, model: str, fetch: Callable[[str], tuple[int, bytes]]) -> dict[str, InputSpec] | None:
        """The model's inputs (cached), or None if the server does not know the model."""
        with self._lock:
            if model in self._configs:
                return self._configs[model]
        status, body = fetch(f"/v2/models/{model}/config")
        if status != 200:
            return None
        try:
            specs = input_specs(json.loads(body))
        except (ValueError, KeyError, TypeError):
            return None
        with self._lock:
            self._configs[model] = specs
        return specs

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1


class _FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    owner: HttpFront
    server_version = "p3b-front"

    def log_message(self, format, *args):  # noqa: A002  (quiet: no line per request on stderr)
        pass

    # ----------------------------------------------------------------- the client connection
    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # reads go through the deadline reader instead
        self._reader = _DeadlineReader(self.connection, self.owner.config)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self.wfile = _Writer(self.connection, self.owner.config.body_timeout_s)
        self._served = 0

    def handle_one_request(self) -> None:
        if self._served:
            self._reader.expect("idle")
        try:
            super().handle_one_request()
        except DeadlineExpired as e:
            self.close_connection = True
            if e.phase == "idle":
                return  # a kept-alive connection that stayed silent: just closed
            self.owner._count("timed_out")
            if self._reader.received:
                _answer_raw(self.connection, 408, str(e), 1.0)
            return
        self._served += 1

    # ----------------------------------------------------------------- upstream
    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = self._conn = http.client.HTTPConnection(LOOPBACK, self.owner.upstream_port,
                                                           timeout=self.owner.config.upstream_timeout_s)
        return conn

    def _drop_upstream(self) -> None:
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            conn.close()

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict[str, str]):
        """One request upstream (one retry on a stale keep-alive connection)."""
        for attempt in (0, 1):
            conn = self._upstream()
            try:
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                return r.status, r.getheaders(), r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_upstream()
                if attempt:
                    raise
            except (OSError, http.client.HTTPException):
                self._drop_upstream()
                raise

    def _fetch(self, path: str) -> tuple[int, bytes]:
        status, _, body = self._exchange("GET", path, None, {})
        return status, body

    # ----------------------------------------------------------------- answers
    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, close: bool = False) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, reason: str, close: bool = False) -> None:
        body = json.dumps({"error": reason}).encode()
        self._send(status, [("Content-Type", "application/json")], body, close)

    # ----------------------------------------------------------------- requests
    def _handle(self) -> None:
        owner = self.owner
        try:
            body = self._read_body()
            if self.command == "POST":
                self._check(body)
        except Rejected as e:
            owner._count("rejected")
            return self._error(e.status, str(e), close=e.status in (411, 413))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        try:
            status, rheaders, rbody = self._exchange(self.command, self.path, body if self.command == "POST" else None,
                                                     headers)
        except (OSError, http.client.HTTPException) as e:
            owner._count("unavailable")
            owner.forget_configs()
            return self._error(503, f"tritonserver unavailable ({type(e).__name__}); retry shortly")
        owner._count("forwarded")
        self._send(status, rheaders, rbody)

    def _read_body(self) -> bytes:
        self._reader.expect("body")
        if self.headers.get("Transfer-Encoding", "identity").lower() != "identity":
            raise Rejected(411, "chunked request bodies are not accepted: send Content-Length")
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "POST":
                raise Rejected(411, "POST needs a Content-Length")
            return b""
        try:
            n = int(length)
        except ValueError:
            raise Rejected(400, "Content-Length must be an integer") from None
        if n < 0:
            raise Rejected(400, "Content-Length must be >= 0")
        if n > self.owner.max_body_bytes:
            if n <= DRAIN_BYTES:  # read and drop it, so that the client gets to read our answer
                while n > 0:
                    chunk = self.rfile.read(min(n, 1 << 20))
                    if not chunk:
                        break
                    n -= len(chunk)
            raise Rejected(413, f"request body of {length} bytes is above the limit of {self.owner.max_body_bytes}")
        body = self.rfile.read(n)
        if len(body) != n:
            raise Rejected(400, f"request body ended after {len(body)} of {n} bytes")
        if encoding != "identity" and n:
            raise Rejected(415, f"compressed request bodies ({encoding}) are not accepted")
        return body

    def _check(self, body: bytes) -> None:
        doc = parse_json_part(body, self.headers.get("Inference-Header-Content-Length"), self.owner.max_depth)
        m = _INFER.match(self.path.split("?", 1)[0])
        if m is None:
            if isinstance(doc, dict) and "inputs" in doc:  # inputs sent to an odd path: bound them all the same
                check_infer(doc, "?", {}, self.owner.max_body_bytes)
            return
        model = m.group(1)
        try:
            specs = self.owner.specs(model, self._fetch)
        except (OSError, http.client.HTTPException):
            specs = {}  # server down: the forward below answers 503
        if specs is None:
            raise Rejected(400, f"unknown model '{model}' (or not ready)")
        check_infer(doc, model, specs, self.owner.max_body_bytes)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle  # noqa: N815

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._drop_upstream()
