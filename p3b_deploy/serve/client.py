"""Talk to a running Triton server: loopback-only addresses, model info, one inference, and a
bounded gRPC benchmark (latency percentiles and throughput at several concurrency levels).

tritonclient is imported inside the functions that need it (`pip install 'tritonclient[grpc,http]'`).
"""
from __future__ import annotations

import ipaddress
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ServeError


def check_loopback(host: str) -> str:
    """`host` if it is a loopback address (127.0.0.0/8, ::1, localhost); ServeError otherwise.

    Load is only ever sent to this machine: a benchmark must not hammer someone else's server."""
    if host == "localhost":
        return host
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ServeError(f"only loopback servers are allowed (127.0.0.1, ::1, localhost), got {host!r}")
    return host


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[::1]:PORT' -> (host, port), loopback only."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ServeError(f"server address must be HOST:PORT (e.g. 127.0.0.1:8001), got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port_n = int(port)
    except ValueError:
        port_n = -1
    if not 1 <= port_n <= 65535:
        raise ServeError(f"server port must be an integer in 1..65535, got {port!r}")
    return check_loopback(host), port_n


def _url(address: str) -> str:
    host, port = parse_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tritonclient(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
    except (ImportError, RuntimeError):  # tritonclient raises RuntimeError when an extra is missing
        raise ServeError(f"the Triton {protocol} client is not installed (pip install 'tritonclient[grpc,http]')") from None
    return tc


# Loopback only, so never through an http(s)_proxy from the environment; large tensors allowed.
_GRPC_ARGS = [("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 2**31 - 1),
              ("grpc.max_receive_message_length", 2**31 - 1)]


def _client(tc, protocol: str, address: str, timeout_s: float = 60.0):
    if protocol == "grpc":
        return tc.InferenceServerClient(_url(address), channel_args=_GRPC_ARGS)
    return tc.InferenceServerClient(_url(address), network_timeout=timeout_s)


def _one_line(e: BaseException) -> str:
    text = getattr(e, "message", lambda: None)() if callable(getattr(e, "message", None)) else None
    text = text or str(e) or type(e).__name__
    return " ".join(text.split())[:300]


@dataclass
class ModelInfo:
    """What a client needs to build requests for one served model (from its server-side config)."""
    name: str  # model name on the server
    input_name: str  # e.g. images
    output_name: str  # e.g. logits
    input_dims: tuple[int, ...]  # per-request dims without the batch axis (C, H, W)
    max_batch_size: int  # 0 = no batch axis
    parameters: dict[str, str] = field(default_factory=dict)  # preprocessing / identity metadata


def model_info(address: str, name: str) -> ModelInfo:
    """Read one model's config from the server over gRPC."""
    tc = _tritonclient("grpc")
    client = _client(tc, "grpc", address)
    try:
        cfg = client.get_model_config(name, as_json=True)["config"]
    except tc.InferenceServerException as e:
        raise ServeError(f"model '{name}' on {address}: {_one_line(e)}") from None
    finally:
        client.close()
    return ModelInfo(name=name, input_name=cfg["input"][0]["name"], output_name=cfg["output"][0]["name"],
                     input_dims=tuple(int(d) for d in cfg["input"][0]["dims"]),
                     max_batch_size=int(cfg.get("max_batch_size", 0)),
                     parameters={k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()})


def infer(address: str, model: str, images: np.ndarray, *, protocol: str = "grpc", input_name: str = "images",
          output_name: str = "logits", datatype: str = "FP32", timeout_s: float = 60.0) -> np.ndarray:
    """One inference request over gRPC or HTTP; the server's error becomes a one-line ServeError."""
    tc = _tritonclient(protocol)
    client = _client(tc, protocol, address, timeout_s)
    try:
        inp = tc.InferInput(input_name, list(images.shape), datatype)
        inp.set_data_from_numpy(images)
        kw = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput(output_name)], **kw)
    except tc.InferenceServerException as e:
        raise ServeError(f"model '{model}': {_one_line(e)}") from None
    except OSError as e:  # the HTTP client lets connection errors through
        raise ServeError(f"model '{model}' on {address}: {_one_line(e)}") from None
    finally:
        client.close()
    out = result.as_numpy(output_name)
    if out is None:
        raise ServeError(f"model '{model}' returned no '{output_name}' output")
    return out


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class ServerBenchConfig:
    """Settings of one server benchmark (saved in the report)."""
    concurrency: tuple[int, ...] = (1, 4, 16)  # requests in flight at once (one client thread each)
    batch: int = 1  # images per request
    max_requests: int = 2000  # per model and concurrency level (timed requests)
    max_seconds: float = 5.0  # per model and concurrency level (timed seconds)
    round_seconds: float = 0.5  # one model's turn before the next one's (interleaving)
    warmup_requests: int = 8  # per model and level, per client thread, untimed
    timeout_s: float = 60.0  # per request
    seed: int = 0  # random input images

    def validate(self) -> None:
        if not self.concurrency or any(int(c) < 1 or int(c) > 256 for c in self.concurrency):
            raise ServeError(f"concurrency levels must be in 1..256, got {list(self.concurrency)}")
        if self.batch < 1 or self.max_requests < 1 or self.max_seconds <= 0 or self.round_seconds <= 0:
            raise ServeError("batch and max requests must be >= 1, max/round seconds > 0")
        if self.max_seconds > 600:
            raise ServeError(f"max seconds per model and level is capped at 600, got {self.max_seconds}")


class GrpcTransport:
    """How `bench_server` talks to a server: one gRPC client per worker thread (tritonclient
    clients are not meant to be shared). Tests pass a stub with the same methods and a fake clock."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, address: str):
        self.tc = _tritonclient("grpc")
        self.address = address
        self.local = threading.local()
        self.all: list[Any] = []
        self.lock = threading.Lock()

    def _get(self):
        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = _client(self.tc, "grpc", self.address)
            with self.lock:
                self.all.append(c)
        return c

    def model_info(self, name: str) -> ModelInfo:
        return model_info(self.address, name)

    def requester(self, info: ModelInfo, x: np.ndarray, timeout_s: float) -> Callable[[], None]:
        """A function that sends one request of `x` to `info.name` from the calling thread."""
        client, tc = self._get(), self.tc
        inp = tc.InferInput(info.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = [tc.InferRequestedOutput(info.output_name)]

        def send() -> None:
            try:
                client.infer(info.name, [inp], outputs=out, client_timeout=timeout_s)
            except tc.InferenceServerException as e:
                raise ServeError(f"model '{info.name}': {_one_line(e)}") from None
        return send

    def statistics(self, name: str) -> dict:
        try:
            s = self._get().get_inference_statistics(name, as_json=True)
        except self.tc.InferenceServerException as e:
            raise ServeError(f"statistics of model '{name}': {_one_line(e)}") from None
        return s["model_stats"][0]

    def server_info(self) -> dict:
        try:
            meta = self._get().get_server_metadata(as_json=True)
            return {"address": self.address, "name": meta.get("name"), "version": meta.get("version")}
        except Exception:  # metadata is informative only; the timings stand without it
            return {"address": self.address}

    def close(self) -> None:
        for c in self.all:
            c.close()
        self.all.clear()


def _burst(pool: ThreadPoolExecutor, transport, info: ModelInfo, x: np.ndarray, workers: int,
           n_requests: int, seconds: float, timeout_s: float) -> tuple[list[float], float]:
    """Up to `n_requests` requests in at most ~`seconds`, `workers` in flight; latencies (ms), wall (s)."""
    clock = transport.clock
    counter = itertools.count()
    stop_at = clock() + seconds

    def work() -> list[float]:
        send = transport.requester(info, x, timeout_s)
        lat = []
        while next(counter) < n_requests and clock() < stop_at:
            t0 = clock()
            send()
            lat.append((clock() - t0) * 1e3)
        return lat

    t0 = clock()
    futures = [pool.submit(work) for _ in range(workers)]
    lat = [v for f in futures for v in f.result()]
    return lat, clock() - t0


def _count(stats: dict) -> tuple[int, int]:
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def bench_server(address: str, models: Sequence[str], config: ServerBenchConfig | None = None, *,
                 transport: Any = None, **options):
    """Time `models` (the first is the baseline) on a running Triton server through gRPC.

    Per concurrency level: each model is warmed up, then the models take turns of `round_seconds`
    (order alternating every round) until each has `max_requests` timed requests or `max_seconds`
    of timed wall time, so machine drift hits all models alike. Returns a BenchReport whose
    records carry `concurrency`, latency percentiles and throughput (images/s over wall time:
    requests x batch / seconds). `transport` replaces the gRPC clients (tests)."""
    from ..bench.report import BenchReport
    from ..bench.sysinfo import system_info
    cfg = ServerBenchConfig(**{**(asdict(config) if config else {}), **options})
    cfg.concurrency = tuple(int(c) for c in cfg.concurrency)
    cfg.validate()
    names = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not names:
        raise ServeError("no models to benchmark (give --models NAME[,NAME...])")
    transport = transport if transport is not None else GrpcTransport(address)
    results = []
    try:
        infos = [transport.model_info(m) for m in names]
        rng = np.random.default_rng(cfg.seed)
        inputs = {}
        for info in infos:
            if info.max_batch_size and cfg.batch > info.max_batch_size:
                raise ServeError(f"batch {cfg.batch} is above model '{info.name}' max_batch_size {info.max_batch_size}")
            shape = ((cfg.batch,) if info.max_batch_size else ()) + info.input_dims
            inputs[info.name] = rng.standard_normal(shape).astype(np.float32)
        for c in cfg.concurrency:
            results += _bench_level(transport, infos, inputs, c, cfg)
        server = transport.server_info()
    finally:
        transport.close()
    _ratios(results, names[0])
    system = system_info(None)
    system["server"] = server
    from importlib import metadata
    try:
        system["versions"]["tritonclient"] = metadata.version("tritonclient")
    except metadata.PackageNotFoundError:  # a source checkout of the client: informative only
        pass
    model_rows = [{"label": i.name, "source": f"triton-grpc://{address}/{i.name}", "kind": "triton",
                   "macs": _int(i.parameters.get("macs")), "params": _int(i.parameters.get("params")),
                   "parameters": i.parameters, "max_batch_size": i.max_batch_size} for i in infos]
    conf = {**asdict(cfg), "server": address, "protocol": "grpc", "models": names,
            "notes": ["client-side latency per request (gRPC round trip, includes queueing in the server); "
                      "throughput = requests x batch / wall time of each model's turns"]}
    return BenchReport(system=system, config=conf, models=model_rows, results=results)


def level_row(info: ModelInfo, latencies_ms: Sequence[float], wall_s: float, batch: int, concurrency: int,
              counts0: tuple[int, int], counts1: tuple[int, int]) -> dict:
    """One result row: latency percentiles of the requests, throughput = requests x batch / wall
    seconds, the server's mean batch per execution from its statistics' counters."""
    from ..bench.stats import latency_stats
    st = latency_stats(latencies_ms, batch)
    (inf0, exe0), (inf1, exe1) = counts0, counts1
    images = len(latencies_ms) * batch
    st.update(model=info.name, backend="triton-grpc", precision="fp32", batch=batch, concurrency=concurrency,
              throughput=images / wall_s if wall_s > 0 else 0.0, timed_s=wall_s, requests=len(latencies_ms),
              images=images, server_batch=(inf1 - inf0) / (exe1 - exe0) if exe1 > exe0 else None,
              macs=_int(info.parameters.get("macs")), params=_int(info.parameters.get("params")), providers=[])
    return st


def _bench_level(transport, infos: list[ModelInfo], inputs: dict, c: int, cfg: ServerBenchConfig) -> list[dict]:
    lat: dict[str, list[float]] = {i.name: [] for i in infos}
    wall = {i.name: 0.0 for i in infos}
    counts0 = {}
    with ThreadPoolExecutor(max_workers=c) as pool:
        for info in infos:  # warm-up: untimed, also opens every thread's connection
            _burst(pool, transport, info, inputs[info.name], c, cfg.warmup_requests * c, cfg.max_seconds, cfg.timeout_s)
            counts0[info.name] = _count(transport.statistics(info.name))
        order = list(infos)
        while True:
            todo = [i for i in order if len(lat[i.name]) < cfg.max_requests and wall[i.name] < cfg.max_seconds]
            if not todo:
                break
            for info in todo:
                left_n = cfg.max_requests - len(lat[info.name])
                left_s = min(cfg.round_seconds, cfg.max_seconds - wall[info.name])
                got, secs = _burst(pool, transport, info, inputs[info.name], c, left_n, left_s, cfg.timeout_s)
                lat[info.name] += got
                wall[info.name] += secs
            order.reverse()  # A B, B A, A B ...: neither model always runs right after the other
    return [level_row(info, lat[info.name], wall[info.name], cfg.batch, c, counts0[info.name],
                      _count(transport.statistics(info.name))) for info in infos]


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _ratios(rows: list[dict], baseline: str) -> None:
    """speedup = throughput / the baseline's at the same concurrency; MAC reduction and efficiency."""
    base = {r["concurrency"]: r for r in rows if r["model"] == baseline}
    for r in rows:
        b = base.get(r["concurrency"])
        r["speedup"] = r["throughput"] / b["throughput"] if b and b["throughput"] else None
        r["mac_reduction"] = b["macs"] / r["macs"] if b and b.get("macs") and r.get("macs") else None
        r["speedup_efficiency"] = r["speedup"] / r["mac_reduction"] \
            if r["speedup"] is not None and r["mac_reduction"] else None
