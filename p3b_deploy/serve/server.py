"""A local Triton Inference Server on a model repository: start, wait until ready, stop cleanly.

    with TritonServer("repo/") as server:          # raises ServeError with the server's reason
        print(server.grpc_address, server.models)   # if a model fails to load

The server listens on loopback only, in its own process group (its python backend stubs too),
and is asked to die with the Python process that started it, so no server outlives its owner.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ServeError
from .runtime import TritonRuntime, find_runtime

LOOPBACK = "127.0.0.1"
_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.+?)\"?$", re.MULTILINE)
_ERROR_LINE = re.compile(r"^error: (.+)$", re.MULTILINE)
_ORT_MISSING = "unable to find backend library for backend 'onnxruntime'"
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: ignore http_proxy


def check_port(port: int, what: str = "port") -> int:
    """`port` if it is free on loopback, a free one if it is 0; ServeError if busy or invalid."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"{what} must be an integer in 1..65535 (0 = pick a free one), got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: connections of a previous server in TIME_WAIT do not make the port busy,
        # only a socket listening on it does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"{what} {port} is busy on {LOOPBACK} (another server?): choose another") from None
            raise ServeError(f"cannot use {what} {port}: {e.strerror or e}") from None
        return s.getsockname()[1]


def load_failure(log: str) -> str | None:
    """The server's own reason why it did not come up, as one line (None if the log has none)."""
    failed = _LOAD_FAILED.findall(log)
    if failed:
        reasons = "; ".join(f"model '{name}' failed to load: {why.strip()}" for name, why in failed)
        if _ORT_MISSING in reasons:
            reasons += (" (this tritonserver has no onnxruntime backend: write the repository with "
                        "--triton-backend python, or serve it with NVIDIA's tritonserver container)")
        return reasons
    errors = _ERROR_LINE.findall(log)
    return errors[-1].strip() if errors else None


def _parent_death_signal():
    """A child-side hook asking Linux to SIGTERM the server when the Python that started it dies
    (even by SIGKILL), or None where prctl is unavailable. libc is looked up here, in the parent:
    between fork and exec a multi-threaded parent's child must not dlopen anything."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def repository_models(repo: Path) -> list[str]:
    """Model names of a repository (folders holding a config.pbtxt); ServeError if none."""
    if not repo.is_dir():
        raise ServeError(f"model repository not found: {repo}")
    names = sorted(d.name for d in repo.iterdir() if (d / "config.pbtxt").is_file() and not d.name.startswith("."))
    if not names:
        raise ServeError(f"no models in {repo} (expected {repo}/<name>/config.pbtxt; write one with "
                         "p3b-deploy export --triton-repo)")
    return names


class TritonServer:
    """A tritonserver process serving `repo` on loopback HTTP and gRPC ports (0 = pick free ones)."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int = 0, grpc_port: int = 0,
                 tritonserver: str | os.PathLike | None = None, ready_timeout: float = 120.0,
                 log_path: str | os.PathLike | None = None, exit_timeout: int = 5):
        self.repo = Path(repo).resolve()
        self.requested_ports = (http_port, grpc_port)
        self.tritonserver = tritonserver
        self.ready_timeout = ready_timeout
        self.exit_timeout = exit_timeout
        self.log_path = Path(log_path) if log_path else None
        self.http_port = self.grpc_port = 0
        self.models: list[str] = []
        self.runtime: TritonRuntime | None = None
        self.process: subprocess.Popen | None = None
        self._own_log = False  # a temp log we made: deleted on stop unless it explains a failure
        self._keep_log = False

    # ------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def log(self) -> str:
        """The server's output so far."""
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "TritonServer":
        """Start the server and wait until every model is ready; ServeError (server stopped) if not."""
        self.models = repository_models(self.repo)
        http, grpc = self.requested_ports
        if http and http == grpc:
            raise ServeError(f"HTTP and gRPC ports must differ, both are {http}")
        self.http_port = check_port(http, "HTTP port")
        self.grpc_port = check_port(grpc, "gRPC port")
        if self.http_port == self.grpc_port:  # two picks of a free port may coincide
            self.grpc_port = check_port(0, "gRPC port")
        self.runtime = find_runtime(self.tritonserver)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver.", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        cmd = [str(self.runtime.binary), f"--model-repository={self.repo}",
               f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
               f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false",  # no third port; statistics come over HTTP/gRPC
               f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0"]
        if self.runtime.backend_dir is not None:
            cmd.append(f"--backend-directory={self.runtime.backend_dir}")
        with open(self.log_path, "ab") as log:
            # Own session: Ctrl-C in a terminal reaches us, not the server; stop() then ends the
            # whole group (server + python backend stubs) in order.
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.runtime.environ(), start_new_session=True,
                                            preexec_fn=_parent_death_signal())
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0, post: bool = False) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=b"{}" if post else None)
        try:
            with _HTTP.open(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(self.models)
        while True:
            if self.process.poll() is not None:
                reason = load_failure(self.log()) or f"tritonserver exited with code {self.process.returncode}"
                self._keep_log = True
                raise ServeError(f"{reason} (server log: {self.log_path})")
            try:
                pending = [m for m in pending if self._get(f"/v2/models/{m}/ready")[0] != 200]
                if not pending:
                    return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                self._keep_log = True
                raise ServeError(f"models not ready after {self.ready_timeout:.0f}s: {', '.join(pending)}"
                                 + self._states(pending) + f" (server log: {self.log_path})")
            time.sleep(0.2)

    def _states(self, names: list[str]) -> str:
        """' (name: STATE reason; ...)' from the repository index, if the server answers."""
        try:
            status, body = self._get("/v2/repository/index", post=True)
            rows = [r for r in json.loads(body) if r.get("name") in names] if status == 200 else []
        except (urllib.error.URLError, OSError, ValueError):
            return ""
        return " (" + "; ".join(f"{r['name']}: {r.get('state', '?')} {r.get('reason', '')}".strip() for r in rows) + ")" \
            if rows else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def statistics(self, model: str) -> dict:
        """Triton's inference statistics of one model (counts, cumulative times), over HTTP."""
        status, body = self._get(f"/v2/models/{model}/stats")
        if status != 200:
            raise ServeError(f"statistics of model '{model}': HTTP {status} {body[:200]!r}")
        return json.loads(body)["model_stats"][0]

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the server (it unloads models and ends its stubs), SIGKILL its whole process group
        if it is not gone after `timeout`; returns its exit code. Nothing of the group remains."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        died = proc.poll() is not None  # exited on its own: its log explains why, keep it
        if not died:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait(5.0)
        deadline = time.monotonic() + 3.0  # stubs exit a moment after the server: give them that
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_group(proc.pid)
        if self._own_log and self.log_path is not None and not (self._keep_log or died):
            self.log_path.unlink(missing_ok=True)
        return proc.returncode

    def wait(self) -> int:
        """Block until the server exits (used by `p3b-deploy serve`)."""
        return self.process.wait() if self.process is not None else 0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
