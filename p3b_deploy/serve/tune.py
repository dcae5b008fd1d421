"""Find the serving config with the most throughput: model instances x ONNX Runtime threads.

Like Triton's Model Analyzer, on a running server: for every point of the grid (e.g. instances
1,2 x threads 1,2) each model is reloaded with that config (Triton's load API with a config
override; the server must run with `--model-control explicit`), then timed by `bench_server`
(all models in turns, at the given concurrency levels). Per model, the best point is the one
with the highest throughput at the highest concurrency whose p99 latency is within the bound.
The best config is loaded at the end, and `write_back` puts it into the repository's
config.pbtxt so the next `serve` starts with it.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ServeError
from ..export.triton import THREADS_PARAMETER

SWEEP_KEYS = ("instances", "threads")


def parse_sweep(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """['instances=1,2', 'threads=1,2'] -> {'instances': (1, 2), 'threads': (1, 2)} (missing keys: (None,))."""
    grid: dict[str, tuple[int, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_KEYS:
            raise ServeError(f"--sweep takes {'=..., '.join(SWEEP_KEYS)}=... (e.g. instances=1,2 threads=1,2), got {item!r}")
        try:
            vals = tuple(dict.fromkeys(int(v) for v in values.split(",") if v.strip()))
        except ValueError:
            vals = ()
        low = 1 if key == "instances" else 0
        if not vals or any(v < low or v > 64 for v in vals):
            raise ServeError(f"--sweep {key}: comma-separated integers in {low}..64, got {values!r}")
        if key in grid:
            raise ServeError(f"--sweep {key} given twice")
        grid[key] = vals
    if not grid:
        raise ServeError("--sweep needs instances=... and/or threads=...")
    return {k: grid.get(k, (None,)) for k in SWEEP_KEYS}


def with_settings(config: dict[str, Any], instances: int | None, threads: int | None) -> dict[str, Any]:
    """A copy of a model config (Triton's JSON form) with `instances` per instance group and
    `threads` ONNX Runtime intra-op threads per instance (None: unchanged)."""
    cfg = json.loads(json.dumps(config))
    if instances is not None:
        groups = cfg.get("instance_group") or [{"kind": "KIND_CPU"}]
        for g in groups:
            g["count"] = instances
        cfg["instance_group"] = groups
    if threads is not None:
        key = THREADS_PARAMETER.get(cfg.get("backend", ""), None)
        if key is None:
            raise ServeError(f"model '{cfg.get('name')}': backend {cfg.get('backend')!r} has no threads setting here")
        cfg.setdefault("parameters", {})[key] = {"string_value": str(threads)}
    return cfg


def settings_of(config: dict[str, Any]) -> dict[str, int | None]:
    """{'instances': count of the first instance group, 'threads': intra-op threads or None}."""
    groups = config.get("instance_group") or [{}]
    key = THREADS_PARAMETER.get(config.get("backend", ""), "")
    threads = config.get("parameters", {}).get(key, {}).get("string_value")
    return {"instances": int(groups[0].get("count", 1)), "threads": int(threads) if threads not in (None, "") else None}


class ModelLoader:
    """Read and reload model configs on a server over gRPC (explicit model control)."""

    def __init__(self, address: str):
        from .client import _client, _tritonclient
        self.tc = _tritonclient("grpc")
        self.address = address
        self.client = _client(self.tc, "grpc", address)

    def config(self, name: str) -> dict[str, Any]:
        from .client import _one_line
        try:
            return self.client.get_model_config(name, as_json=True)["config"]
        except self.tc.InferenceServerException as e:
            raise ServeError(f"model '{name}' on {self.address}: {_one_line(e)}") from None

    def load(self, config: dict[str, Any]) -> None:
        from .client import _one_line
        name = config["name"]
        try:
            self.client.load_model(name, config=json.dumps(config), client_timeout=600)
        except self.tc.InferenceServerException as e:
            why = _one_line(e)
            hint = " (start the server with: p3b-deploy serve REPO --model-control explicit)" \
                if "explicit" in why or "not allowed" in why else ""
            raise ServeError(f"cannot reload model '{name}' with another config: {why}{hint}") from None
        if not self.client.is_model_ready(name):
            raise ServeError(f"model '{name}' is not ready after reloading it")

    def close(self) -> None:
        self.client.close()


@dataclass
class SweepResult:
    """Every grid point's numbers and the best point per model."""
    rows: list[dict[str, Any]]  # model, instances, threads, concurrency, throughput, p50/p99, within_bound
    best: dict[str, dict[str, Any] | None]  # model -> its best row at the top concurrency (None: none in bound)
    p99_bound_ms: float | None
    concurrency: int  # the level the choice is made at
    original: dict[str, dict[str, int | None]] = field(default_factory=dict)  # model -> settings before
    system: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "best": self.best, "p99_bound_ms": self.p99_bound_ms,
                "concurrency": self.concurrency, "original": self.original, "system": self.system}

    def to_markdown(self) -> str:
        bound = f"p99 <= {self.p99_bound_ms:g} ms" if self.p99_bound_ms else "no p99 bound"
        lines = [f"Config sweep at concurrency {self.concurrency} ({bound}); best = most img/s within the bound.", "",
                 "| model | instances | threads | concurrency | img/s | p50 ms | p99 ms | server batch | best |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            b = self.best.get(r["model"])
            is_best = b is not None and r["concurrency"] == self.concurrency and \
                (b["instances"], b["threads"]) == (r["instances"], r["threads"])
            sb = f"{r['server_batch']:.2f}" if r.get("server_batch") else "-"
            lines.append(f"| {r['model']} | {r['instances']} | {_t(r['threads'])} | {r['concurrency']} "
                         f"| {r['throughput']:.1f} | {r['median_ms']:.1f} | {r['p99_ms']:.1f} | {sb} "
                         f"| {'**best**' if is_best else ('' if r['within_bound'] else 'p99 over bound')} |")
        return "\n".join(lines) + "\n"


def _t(threads: int | None) -> str:
    return "default" if threads is None else str(threads)


def sweep(address: str, models: Sequence[str], grid: dict[str, tuple[int, ...]], *,
          p99_bound_ms: float | None = None, passes: int = 1, progress=None, **bench_options) -> SweepResult:
    """Time every grid point (see the module docstring); the best config stays loaded.
    passes=2 times the grid forward, then backward (drift of the machine hits every point alike):
    a point's throughput is then the mean over the passes, its latencies the worst pass's."""
    from .client import bench_server
    names = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if passes < 1:
        raise ServeError(f"sweep passes must be >= 1, got {passes}")
    loader = ModelLoader(address)
    raw: dict[tuple, list[dict[str, Any]]] = {}
    try:
        original = {m: loader.config(m) for m in names}
        points = list(itertools.product(grid["instances"], grid["threads"]))
        order = [p for k in range(passes) for p in (points if k % 2 == 0 else points[::-1])]
        for k, (inst, thr) in enumerate(order):
            for m in names:
                loader.load(with_settings(original[m], inst, thr))
            if progress:
                progress(f"config {k + 1}/{len(order)}: instances {inst or 'as is'}, threads {_t(thr)}")
            report = bench_server(address, names, **bench_options)
            for r in report.results:
                s = settings_of(with_settings(original[r["model"]], inst, thr))
                raw.setdefault((r["model"], s["instances"], s["threads"], r["concurrency"]), []).append(r)
        rows = aggregate_passes(raw, p99_bound_ms)
        top = max(r["concurrency"] for r in rows)
        best = pick_best(rows, names, top)
        for m in names:  # leave the server on the best config (or as it was)
            b = best[m]
            loader.load(with_settings(original[m], b["instances"], b["threads"]) if b else original[m])
        system = report.system
    finally:
        loader.close()
    return SweepResult(rows=rows, best=best, p99_bound_ms=p99_bound_ms, concurrency=top,
                       original={m: settings_of(c) for m, c in original.items()}, system=system)


def aggregate_passes(raw: dict[tuple, list[dict[str, Any]]], p99_bound_ms: float | None) -> list[dict[str, Any]]:
    """{(model, instances, threads, concurrency): bench rows of each pass} -> one row per point:
    mean throughput over the passes, the worst pass's latencies, whether p99 is within the bound."""
    rows = []
    for (model, inst, thr, c), rs in raw.items():
        p99 = max(r["p99_ms"] for r in rs)
        batches = [r["server_batch"] for r in rs if r.get("server_batch")]
        rows.append({"model": model, "instances": inst, "threads": thr, "concurrency": c,
                     "throughput": sum(r["throughput"] for r in rs) / len(rs),
                     "throughput_passes": [r["throughput"] for r in rs],
                     "median_ms": max(r["median_ms"] for r in rs), "p99_ms": p99,
                     "server_batch": sum(batches) / len(batches) if batches else None,
                     "requests": sum(r["requests"] for r in rs), "macs": rs[0].get("macs"),
                     "within_bound": p99_bound_ms is None or p99 <= p99_bound_ms})
    return rows


def pick_best(rows: list[dict[str, Any]], models: Sequence[str], concurrency: int) -> dict[str, dict[str, Any] | None]:
    """Per model, the row with the most throughput at `concurrency` among those within the p99 bound."""
    best = {}
    for m in models:
        ok = [r for r in rows if r["model"] == m and r["concurrency"] == concurrency and r["within_bound"]]
        best[m] = max(ok, key=lambda r: r["throughput"]) if ok else None
    return best


def write_back(repo: str | os.PathLike, model: str, instances: int | None, threads: int | None) -> Path:
    """Set instances / threads in REPO/<model>/config.pbtxt (parsed and rewritten with Triton's
    schema; written atomically). Needs tritonclient (its model_config_pb2)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from ..io import write_text
    path = Path(repo) / model / "config.pbtxt"
    if not path.is_file():
        raise ServeError(f"no {path}: --write-back takes the repository folder the server serves")
    try:
        cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise ServeError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    if instances is not None:
        if not cfg.instance_group:
            cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU)
        for g in cfg.instance_group:
            g.count = instances
    if threads is not None:
        key = THREADS_PARAMETER.get(cfg.backend)
        if key is None:
            raise ServeError(f"{path}: backend {cfg.backend!r} has no threads setting here")
        cfg.parameters[key].string_value = str(threads)
    write_text(path, text_format.MessageToString(cfg))
    return path
