"""`p3b-deploy serve REPO`: run a local Triton Inference Server on a model repository until Ctrl-C.

The server is supervised: if it dies, `serve` says why (exit signal, the server's last log line)
and starts it again on the same ports, with backoff, up to --max-restarts times in a row.
Imports no torch: serving needs only the runtime from `bash scripts/setup.sh --serve`.
"""
from __future__ import annotations

import argparse
import signal
import sys

from .options import add_config_args, config_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="REPO", help="Triton model repository (export --triton-repo DIR, one or more models)")
    p.add_argument("--http-port", type=int, default=8000, metavar="P", help="HTTP port on 127.0.0.1 (default 8000; 0 = any free)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="Q", help="gRPC port on 127.0.0.1 (default 8001; 0 = any free)")
    p.add_argument("--tritonserver", metavar="PATH", default=None,
                   help="tritonserver binary (default: the one set up by scripts/setup.sh --serve in .venv-serve/)")
    p.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for every model to be ready (default 120)")
    p.add_argument("--log", metavar="FILE", default=None, help="write the server's log here (default: a temp file)")
    p.add_argument("--max-restarts", type=int, default=5, metavar="N",
                   help="restart a server that dies at most N times in a row (0 = never; a server up for "
                        "60 s resets the count; default 5)")
    p.add_argument("--model-control", choices=("none", "explicit"), default="none",
                   help="explicit: clients may reload models with another config (bench --server --sweep)")
    p.add_argument("--instances", type=int, default=None, metavar="N",
                   help="model instances per model, instead of the repository's config")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="ONNX Runtime intra-op threads per instance, instead of the repository's config (0 = ORT's default)")
    add_config_args(p.add_argument_group("HTTP front (limits for clients)"), _front_config())


def _front_config() -> type:
    from ..serve.front import FrontConfig  # stdlib only: no tritonclient, no torch
    return FrontConfig


def front_config(args: argparse.Namespace):
    """The FrontConfig of the given flags (defaults for the others)."""
    cls = _front_config()
    return cls().replace(**config_overrides(args, cls))


def _raise_interrupt(signum, frame):  # SIGTERM ends `serve` the same clean way as Ctrl-C
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from ..serve import TritonServer
    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          tritonserver=args.tritonserver, ready_timeout=args.ready_timeout, log_path=args.log,
                          restart=args.max_restarts > 0, max_restarts=max(args.max_restarts, 0),
                          front=front_config(args), model_control=args.model_control,
                          instances=args.instances, threads=args.threads, on_event=_say)
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and `kill -INT` must still stop us.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server:
            print(f"serving {', '.join(server.models)} from {server.repo}")
            print(f"  HTTP  http://{server.http_url}  (e.g. curl {server.http_url}/v2/models/{server.models[0]})")
            print(f"  gRPC  {server.grpc_address}  (e.g. p3b-deploy bench --server {server.grpc_address} "
                  f"--models {','.join(server.models)})")
            print("Ctrl-C stops the server", flush=True)
            code = server.wait()
            from ..serve.server import exit_reason, last_log_line
            if server.gave_up is not None:
                why = f"died {len(server.deaths)} time(s), gave up after {server.restarts} restart(s); last: {server.gave_up}"
            else:
                why = f"died ({exit_reason(code)}; last log line: {last_log_line(server.log()) or '(none)'})"
            print(f"error: tritonserver {why} (log: {server.log_path})", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
