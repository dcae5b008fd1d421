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
gRPC is not behind the front: the same requests over gRPC are refused by Triton itself
(checked in tests/serve/test_serve.py).
"""
from __future__ import annotations

import http.client
import json
import math
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

LOOPBACK = "127.0.0.1"
_INFER = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer$")
# bytes per element; BYTES elements are at least 4 bytes (length prefix)
DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
               "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length"}
MAX_DIM = 2**31 - 1
DRAIN_BYTES = 1 << 30  # a too-large body up to this size is read (and dropped) before the 413


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
    """

    def __init__(self, upstream_port: int, port: int = 0, *, max_body_bytes: int = 64 << 20, max_depth: int = 32,
                 timeout_s: float = 120.0, idle_s: float = 60.0):
        self.upstream_port = upstream_port
        self.requested_port = port
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self.counts = {"forwarded": 0, "rejected": 0, "unavailable": 0}
        self._configs: dict[str, dict[str, InputSpec]] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else 0

    def start(self) -> "HttpFront":
        front = self

        class Handler(_FrontHandler):
            owner = front
            timeout = front.idle_s  # idle keep-alive connections end after this

        httpd = ThreadingHTTPServer((LOOPBACK, self.requested_port), Handler, bind_and_activate=False)
        httpd.daemon_threads = True
        httpd.allow_reuse_address = True
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

    # ----------------------------------------------------------------- upstream
    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = self._conn = http.client.HTTPConnection(LOOPBACK, self.owner.upstream_port,
                                                           timeout=self.owner.timeout_s)
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
