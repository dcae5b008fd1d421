"""`p3b-deploy serve REPO`: run a local Triton Inference Server on a model repository until Ctrl-C.

Imports no torch: serving needs only the runtime from `bash scripts/setup.sh --serve`.
"""
from __future__ import annotations

import argparse
import signal
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="REPO", help="Triton model repository (export --triton-repo DIR, one or more models)")
    p.add_argument("--http-port", type=int, default=8000, metavar="P", help="HTTP port on 127.0.0.1 (default 8000; 0 = any free)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="Q", help="gRPC port on 127.0.0.1 (default 8001; 0 = any free)")
    p.add_argument("--tritonserver", metavar="PATH", default=None,
                   help="tritonserver binary (default: the one set up by scripts/setup.sh --serve in .venv-serve/)")
    p.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for every model to be ready (default 120)")
    p.add_argument("--log", metavar="FILE", default=None, help="write the server's log here (default: a temp file)")


def _raise_interrupt(signum, frame):  # SIGTERM ends `serve` the same clean way as Ctrl-C
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    from ..serve import TritonServer
    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          tritonserver=args.tritonserver, ready_timeout=args.ready_timeout, log_path=args.log)
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
            print(f"error: tritonserver exited on its own with code {code} (log: {server.log_path})", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
