"""Slow HTTP clients on loopback, for the front's deadline tests (fast and slow suites).

`storm(port, ...)` opens `heads` connections that send a request line and then trickle one header
line every `trickle_s`, and `bodies` that announce a 1 MB body, send 10 bytes and trickle one byte
every `trickle_s`. One thread drives them all with a selector until each is closed by the server
or `limit_s` has passed. The trickle keeps every per-read timeout from firing: only a deadline for
the whole head (or body) closes them.
"""
from __future__ import annotations

import http.client
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

HEAD = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n"
BODY = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n" + b"{" * 10


@dataclass
class SlowClient:
    kind: str  # "head" or "body"
    sock: socket.socket
    started: float
    closed: float | None = None  # when the server closed it
    answer: bytes = b""  # what the server sent before closing


@dataclass
class StormResult:
    clients: list[SlowClient]
    open_at_end: int = 0
    normal: list = field(default_factory=list)  # (status or error text) of the normal requests meanwhile

    def lifetimes(self, kind: str) -> list[float]:
        return [c.closed - c.started for c in self.clients if c.kind == kind and c.closed is not None]


def storm(port: int, heads: int, bodies: int, trickle_s: float, limit_s: float) -> StormResult:
    sel = selectors.DefaultSelector()
    clients = []
    for kind, n, first in (("head", heads, HEAD), ("body", bodies, BODY)):
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(first)
            s.setblocking(False)
            c = SlowClient(kind, s, time.monotonic())
            clients.append(c)
            sel.register(s, selectors.EVENT_READ, c)
    end = time.monotonic() + limit_s
    next_trickle = time.monotonic() + trickle_s
    open_ = len(clients)
    while open_ and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.05):
            c = key.data
            try:
                data = c.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:  # reset
                data = b""
            if data:
                c.answer += data
                continue
            c.closed = time.monotonic()
            sel.unregister(c.sock)
            c.sock.close()
            open_ -= 1
        if time.monotonic() >= next_trickle:
            next_trickle += trickle_s
            for c in clients:
                if c.closed is None:
                    try:
                        c.sock.send(b"X-Slow: 1\r\n" if c.kind == "head" else b"0")
                    except OSError:
                        pass
    for c in clients:
        if c.closed is None:
            c.sock.close()
    sel.close()
    return StormResult(clients, open_)


def normal_requests(port: int, stop: threading.Event, out: list, post: bytes | None = None,
                    path: str = "/v2/health/ready", pause_s: float = 0.1) -> None:
    """Requests on fresh connections until `stop` is set: GET `path`, or POST `post` (JSON) to it;
    appends each answer's (status, body) or, on a failure, the error's type name to `out`."""
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            if post is None:
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=post, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            out.append((r.status, r.read()))
        except (OSError, http.client.HTTPException) as e:
            out.append(type(e).__name__)
        finally:
            conn.close()
        stop.wait(pause_s)


def settle(count, target: int, seconds: float) -> int:
    """Poll `count()` until it is <= target or `seconds` passed; returns the last value."""
    end = time.monotonic() + seconds
    n = count()
    while n > target and time.monotonic() < end:
        time.sleep(0.05)
        n = count()
    return n
