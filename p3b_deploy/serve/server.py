"""A local Triton Inference Server on a model repository: start, wait until ready, stop cleanly.

    with TritonServer("repo/") as server:          # raises ServeError with the server's reason
        print(server.grpc_address, server.models)   # if a model fails to load

The server listens on loopback only, in its own process group (its python backend stubs too).
A watchdog process ends that group when the Python process that started it ends (however it
ends, whichever thread started the server), so no server outlives its owner. HTTP clients go
through a checking front (front.py); with restart=True a supervisor thread restarts a server
that dies, saying why each time.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ServeError
from .front import FrontConfig, HttpFront
from .runtime import TritonRuntime, find_runtime

LOOPBACK = "127.0.0.1"
# What the server logs when a model does not load (log lines are quoted, with \n escaped):
_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.+?)\"?$", re.MULTILINE)  # model code/files
_MODEL_FAILED = re.compile(r"failed to load model '([^']+)': (.+?)\"?$", re.MULTILINE)  # e.g. no version folder
_POLL_FAILED = re.compile(r"Poll failed for model directory '([^']+)': (.+?)\"?$", re.MULTILINE)  # config.pbtxt
_ERROR_LINE = re.compile(r"^error: (.+)$", re.MULTILINE)
_FRAME = re.compile(r"(\S*model\.py)\((\d+)\)")  # a python backend traceback frame in model.py
_TEXT_PROTO = re.compile(r"failed to read text proto from (\S+config\.pbtxt)")
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


def _reason(text: str) -> str:
    """One line of a logged reason: the python backend's traceback ("\\n\\nAt:\\n" frames) becomes
    the model.py line it points at; nothing after the first line remains."""
    text = text.replace('\\"', '"')
    head, _, trace = text.partition("\\n\\nAt:\\n")
    head = " ".join(head.split("\\n")[0].split())
    frame = _FRAME.search(trace)
    if frame:
        head += f" (at {frame.group(1)} line {frame.group(2)})"
    proto = _TEXT_PROTO.search(head)
    if proto:
        head += _pbtxt_error(Path(proto.group(1)))
    if head.startswith("at least one version must be available"):
        head += " (a model needs a version folder with the model in it, e.g. <model>/1/)"
    return head


def _pbtxt_error(path: Path) -> str:
    """': LINE:COL : what' from parsing config.pbtxt with Triton's schema (where tritonclient is
    installed; the server itself does not say where the syntax error is)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return ""
    try:
        text_format.Parse(path.read_text(errors="replace"), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        return f": {' '.join(str(e).split())}"
    except OSError:
        return ""
    return ""


def load_failure(log: str) -> str | None:
    """The server's own reason why it did not come up, as one line (None if the log has none):
    per failed model what the server said, without traceback text."""
    failed = {}
    for pattern in (_POLL_FAILED, _MODEL_FAILED, _LOAD_FAILED):
        for name, why in pattern.findall(log):
            failed.setdefault(name, _reason(why))
    if failed:
        reasons = "; ".join(f"model '{name}' failed to load: {why}" for name, why in failed.items())
        if _ORT_MISSING in reasons:
            reasons += (" (this tritonserver has no onnxruntime backend: write the repository with "
                        "--triton-backend python, or serve it with NVIDIA's tritonserver container)")
        return reasons
    errors = _ERROR_LINE.findall(log)
    return " ".join(errors[-1].split()) if errors else None


# The lifetime link: a watchdog process per server reads a pipe whose only write end this Python
# process holds. The kernel closes it when the process ends, however it ends (even SIGKILL), and
# not when a thread ends (PR_SET_PDEATHSIG would fire when the *thread* that started the server
# exits, so a server started from a worker thread died with that thread). On EOF the watchdog
# SIGTERMs the server's process group, then SIGKILLs what is left after the grace period.
_WATCHDOG = """
import os, signal, sys, time
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.read(0, 4096):
    pass
def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False
if alive():
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        pass
    end = time.monotonic() + grace
    while alive() and time.monotonic() < end:
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class _Lifeline:
    """The watchdog of one server process group; `release()` when the group is gone."""

    def __init__(self, pgid: int, grace_s: float):
        import sys
        read, self._write = os.pipe()  # both non-inheritable; only `read` is passed, as stdin
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pgid), str(grace_s)],
                                         stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            os.close(read)

    def release(self) -> None:
        if self._write is not None:
            os.close(self._write)
            self._write = None
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def exit_reason(code: int | None) -> str:
    """'killed by signal 11 (SIGSEGV)' / 'exit code 1' for a Popen return code."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


_NOISE = re.compile(r"^\s*(\d+#\s|[+|]|$)")  # stack frames, table borders/rows, blank lines


def last_log_line(log: str) -> str | None:
    """The server's last informative log line (no stack frames or tables), shortened to one line."""
    for line in reversed(log.splitlines()):
        if not _NOISE.match(line):
            return " ".join(line.split())[:240]
    return None


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


@dataclass
class RestartPolicy:
    """When to restart a server that died: after backoff_s, doubling with each restart in a row up
    to max_backoff_s; a server that was up stable_s seconds starts a new streak; after
    max_restarts restarts in a row, give up."""
    max_restarts: int = 5  # restarts in a row before giving up (0 = never restart)
    backoff_s: float = 1.0  # delay before the first restart of a streak
    max_backoff_s: float = 30.0  # the doubling stops here
    stable_s: float = 60.0  # uptime after which a death starts a new streak
    streak: int = 0  # restarts in the current streak

    def __post_init__(self):
        if self.max_restarts < 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s or self.stable_s < 0:
            raise ServeError("max restarts and backoff must be >= 0 (max backoff >= backoff), stable seconds >= 0")

    def next_delay(self, uptime: float) -> float | None:
        """Seconds to wait before restarting a server that died after `uptime` seconds (its
        restart counts in the streak), or None: give up."""
        if uptime >= self.stable_s:
            self.streak = 0
        if self.streak >= self.max_restarts:
            return None
        self.streak += 1
        return min(self.backoff_s * 2 ** (self.streak - 1), self.max_backoff_s)


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
    """A tritonserver process serving `repo` on loopback HTTP and gRPC ports (0 = pick free ones).

    restart=True supervises it: when the server dies on its own, the reason (exit signal and the
    server's last log line) goes to `on_event` and the server is started again on the same ports
    after a backoff (backoff_s, doubling up to max_backoff_s); after `max_restarts` restarts in a
    row (a server that stayed up `stable_s` seconds resets the count) it gives up: `wait()` returns
    and `gave_up` holds the last reason (the arithmetic: `RestartPolicy`).
    front=True (default) or a FrontConfig (its limits: body size, client deadlines, connections)
    puts the HTTP front of `front.py` on `http_port` and Triton's own HTTP on an internal loopback
    port, so requests that crash tritonserver never reach it; front=False: Triton's HTTP itself.
    """

    def __init__(self, repo: str | os.PathLike, *, http_port: int = 0, grpc_port: int = 0,
                 tritonserver: str | os.PathLike | None = None, ready_timeout: float = 120.0,
                 log_path: str | os.PathLike | None = None, exit_timeout: int = 5, restart: bool = False,
                 max_restarts: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 30.0, stable_s: float = 60.0,
                 front: bool | FrontConfig = True, model_control: str = "none",
                 instances: int | None = None, threads: int | None = None,
                 on_event: Callable[[str], None] | None = None):
        self.policy = RestartPolicy(max_restarts, backoff_s, max_backoff_s, stable_s)
        self.front_config = (FrontConfig() if front is True else front or None)
        if self.front_config is not None:
            self.front_config.validate()
        if model_control not in ("none", "explicit"):
            raise ServeError(f"model control must be none or explicit, got {model_control!r}")
        if (instances is not None and instances < 1) or (threads is not None and threads < 0):
            raise ServeError("instances must be >= 1 and threads per instance >= 0 (0 = ORT's default)")
        self.settings = (instances, threads)  # served instead of the repository's, on every (re)start
        if instances is not None or threads is not None:
            model_control = "explicit"  # they are applied by reloading each model with a config override
        self.repo = Path(repo).resolve()
        self.requested_ports = (http_port, grpc_port)
        self.tritonserver = tritonserver
        self.ready_timeout = ready_timeout
        self.exit_timeout = exit_timeout
        self.log_path = Path(log_path) if log_path else None
        self.restart = restart
        self.use_front = self.front_config is not None
        self.model_control = model_control
        self.on_event = on_event
        self.http_port = self.grpc_port = self.upstream_http_port = 0
        self.models: list[str] = []
        self.runtime: TritonRuntime | None = None
        self.process: subprocess.Popen | None = None
        self.front: HttpFront | None = None
        self.restarts = 0  # restarts done by the supervisor
        self.deaths: list[str] = []  # why the server died, each time it died on its own
        self.events: list[str] = []  # what the supervisor said
        self.gave_up: str | None = None  # the last death's reason once the supervisor gave up
        self.last_code: int | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lifeline: _Lifeline | None = None
        self._log_offset = 0
        self._started_at = 0.0
        self._clock = time.monotonic  # uptime of a server that died (a fake clock in tests)
        self._own_log = False  # a temp log we made: deleted on stop unless it explains a failure
        self._keep_log = False

    # ------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        """Where HTTP clients connect (the front, or Triton itself with front=False)."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def log(self) -> str:
        """The server's output so far (all incarnations)."""
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def _current_log(self) -> str:
        """The output of the current (or last) server process only."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except (OSError, TypeError):
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
        taken = {self.http_port}
        while self.grpc_port in taken:  # two picks of a free port may coincide
            self.grpc_port = check_port(0, "gRPC port")
        taken.add(self.grpc_port)
        self.upstream_http_port = self.http_port
        if self.use_front:
            while self.upstream_http_port in taken:
                self.upstream_http_port = check_port(0, "internal HTTP port")
        self.runtime = find_runtime(self.tritonserver)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver.", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self._stopping.clear()
        self._done.clear()
        self.policy.streak = 0
        try:
            self._launch()
            if self.use_front:
                try:
                    self.front = HttpFront(self.upstream_http_port, self.http_port, self.front_config).start()
                except OSError as e:
                    raise ServeError(f"cannot listen on HTTP port {self.http_port}: {e.strerror or e}") from None
        except BaseException:
            self.stop()
            raise
        if self.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="tritonserver-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _command(self) -> list[str]:
        cmd = [str(self.runtime.binary), f"--model-repository={self.repo}",
               f"--http-address={LOOPBACK}", f"--http-port={self.upstream_http_port}",
               f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false",  # no third port; statistics come over HTTP/gRPC
               f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0"]
        if self.model_control == "explicit":  # models load at start and may be reloaded with a new config
            cmd += ["--model-control-mode=explicit", "--load-model=*"]
        if self.runtime.backend_dir is not None:
            cmd.append(f"--backend-directory={self.runtime.backend_dir}")
        return cmd

    def _launch(self) -> None:
        """Start one server process (with its lifeline) and wait until its models are ready."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0
        with open(self.log_path, "ab") as log:
            # Own session: Ctrl-C in a terminal reaches us, not the server; stop() then ends the
            # whole group (server + python backend stubs) in order.
            proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.runtime.environ(), start_new_session=True)
        lifeline = _Lifeline(proc.pid, self.exit_timeout + 5.0)
        with self._lock:
            stopping = self._stopping.is_set()
            if not stopping:
                self.process, self._lifeline = proc, lifeline
        if stopping:  # stop() came while we were starting: this process is nobody's
            self._end(proc, lifeline)
            raise ServeError("stopped while starting")
        self._started_at = self._clock()
        self._wait_ready(proc)
        if self.settings != (None, None):
            self._apply_settings()

    def _apply_settings(self) -> None:
        from .tune import ModelLoader, with_settings
        loader = ModelLoader(self.grpc_address)
        try:
            for m in self.models:
                loader.load(with_settings(loader.config(m), *self.settings))
        finally:
            loader.close()

    def _get(self, path: str, timeout: float = 2.0, post: bool = False) -> tuple[int, bytes]:
        """A request to Triton's own HTTP endpoint (not through the front)."""
        req = urllib.request.Request(f"http://{LOOPBACK}:{self.upstream_http_port}{path}", data=b"{}" if post else None)
        try:
            with _HTTP.open(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(self.models)
        while True:
            if proc.poll() is not None:
                reason = load_failure(self._current_log()) or \
                    f"tritonserver {exit_reason(proc.returncode)} (last log line: {last_log_line(self._current_log())})"
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

    # ------------------------------------------------------------------ supervision
    def _event(self, message: str) -> None:
        self.events.append(message)
        if self.on_event is not None:
            self.on_event(message)

    def _supervise(self) -> None:
        policy = self.policy
        proc = self.process
        while proc is not None:
            code = proc.wait()
            if self._stopping.is_set():
                return
            up = self._clock() - self._started_at
            reason = f"{exit_reason(code)}; last log line: {last_log_line(self._current_log()) or '(none)'}"
            self.last_code = code
            self._keep_log = True
            with self._lock:
                lifeline, self.process, self._lifeline = self._lifeline, None, None
            self._end(proc, lifeline)  # the group's leftovers (backend stubs)
            if self.front is not None:
                self.front.forget_configs()
            while True:
                self.deaths.append(reason)
                delay = policy.next_delay(up)
                if delay is None:
                    self.gave_up = reason
                    self._event(f"tritonserver died ({reason}); giving up after {policy.streak} restart(s) in a row")
                    self._done.set()
                    return
                self._event(f"tritonserver died ({reason}); restart {policy.streak}/{policy.max_restarts} "
                            f"in {delay:.1f}s")
                if self._stopping.wait(delay):
                    return
                try:
                    self._launch()
                except ServeError as e:
                    if self._stopping.is_set():
                        return
                    reason, up = f"restart failed: {e}", 0.0
                    with self._lock:
                        failed, self.process, lifeline = self.process, None, self._lifeline
                        self._lifeline = None
                    if failed is not None:
                        self._end(failed, lifeline)
                    continue
                self.restarts += 1
                proc = self.process
                self._event(f"tritonserver restarted (pid {proc.pid}), models ready")
                break

    # ------------------------------------------------------------------ use
    def alive(self) -> bool:
        proc = self.process
        return proc is not None and proc.poll() is None

    def statistics(self, model: str) -> dict:
        """Triton's inference statistics of one model (counts, cumulative times), over HTTP."""
        status, body = self._get(f"/v2/models/{model}/stats")
        if status != 200:
            raise ServeError(f"statistics of model '{model}': HTTP {status} {body[:200]!r}")
        return json.loads(body)["model_stats"][0]

    def _end(self, proc: subprocess.Popen, lifeline: _Lifeline | None, timeout: float = 20.0) -> int | None:
        """SIGTERM the server (it unloads models and ends its stubs), SIGKILL its whole process group
        if it is not gone after `timeout`; nothing of the group remains, then the lifeline goes."""
        if proc.poll() is None:
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
        if lifeline is not None:
            lifeline.release()
        return proc.returncode

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the front, the supervisor and the server; returns the server's exit code
        (None if it was not running). Safe to call twice."""
        self._stopping.set()
        if self.front is not None:
            self.front.stop()
            self.front = None
        with self._lock:
            proc, lifeline, self.process, self._lifeline = self.process, self._lifeline, None, None
        died = proc is not None and proc.poll() is not None  # exited on its own: its log explains why, keep it
        code = self._end(proc, lifeline, timeout) if proc is not None else None
        sup, self._supervisor = self._supervisor, None
        if sup is not None and sup is not threading.current_thread():
            sup.join(timeout + 10.0)
        self._done.set()
        if self._own_log and self.log_path is not None and not (self._keep_log or died):
            self.log_path.unlink(missing_ok=True)
        return code

    def wait(self) -> int:
        """Block until the server is gone for good (used by `p3b-deploy serve`): with restart=True,
        until the supervisor gives up; returns the last exit code."""
        if self.restart and self._supervisor is not None:
            while not self._done.wait(0.5):
                pass
            return self.last_code if self.last_code is not None else 0
        proc = self.process
        if proc is None:
            return 0
        self.last_code = proc.wait()
        return self.last_code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
