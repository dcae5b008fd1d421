"""Find a `tritonserver` binary and what it needs to run: backends folder, libraries, stub Python.

The bundled runtime is `.venv-serve/` made by `bash scripts/setup.sh --serve`: the server from the
`nvidia-pytriton` wheel (its libraries in `nvidia_pytriton.libs/`), the python backend with the
stub for that environment's Python, and numpy<2 + onnxruntime for the stub. The stub's embedded
Python finds that environment through PATH (its `bin/python3` comes first), so the main
environment's numpy 2 never reaches it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ServeError

SERVE_ENV = ".venv-serve"  # folder name of the bundled runtime, next to the project's .venv
ENV_VAR = "P3B_SERVE_ENV"  # points at a runtime elsewhere (e.g. a shared install)
SETUP_HINT = "run: bash scripts/setup.sh --serve"


@dataclass
class TritonRuntime:
    """A runnable tritonserver: the binary, its backends folder, and the environment it needs."""
    binary: Path  # the tritonserver executable
    backend_dir: Path | None  # --backend-directory (None = the server's default, /opt/tritonserver/backends)
    env: dict[str, str] = field(default_factory=dict)  # variables to set (LD_LIBRARY_PATH, PATH)
    python_env: Path | None = None  # the environment the python backend stub runs in

    def versions(self) -> dict[str, str]:
        """Versions of what the python backend stub runs with (nvidia-pytriton, numpy, onnxruntime)."""
        from importlib import metadata
        sites = sorted(self.python_env.glob("lib/python3*/site-packages")) if self.python_env else []
        out = {}
        for dist in metadata.distributions(path=[str(s) for s in sites]):
            if dist.metadata["Name"] in ("nvidia-pytriton", "numpy", "onnxruntime"):
                out[dist.metadata["Name"]] = dist.version
        return out

    def environ(self) -> dict[str, str]:
        """os.environ with this runtime's variables prepended/set."""
        out = dict(os.environ)
        for key, value in self.env.items():
            old = out.get(key)
            out[key] = f"{value}:{old}" if key in ("PATH", "LD_LIBRARY_PATH") and old else value
        return out


def _candidates() -> list[Path]:
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR])]
    root = Path(__file__).resolve().parents[2]  # the checkout (editable install) holding .venv-serve
    return list(dict.fromkeys([root / SERVE_ENV, Path.cwd() / SERVE_ENV]))


def _python_libdir(env: Path) -> Path | None:
    """LIBDIR of the venv's base Python (where its libpython3.X.so is), read from pyvenv.cfg."""
    cfg = env / "pyvenv.cfg"
    if not cfg.is_file():
        return None
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            lib = Path(value.strip()).parent / "lib"
            return lib if lib.is_dir() else None
    return None


def _wheel_runtime(binary: Path) -> TritonRuntime | None:
    """The runtime around a binary that sits in an installed nvidia-pytriton wheel, else None."""
    ts = binary.parent.parent  # .../site-packages/pytriton/tritonserver
    site = ts.parent.parent
    libs = site / "nvidia_pytriton.libs"
    if ts.name != "tritonserver" or not libs.is_dir():
        return None
    env_root = site.parents[2] if site.parent.parent.name == "lib" else None  # <env>/lib/python3.X/site-packages
    ld = [str(libs)]
    libdir = _python_libdir(env_root) if env_root else None
    if libdir:
        ld.insert(0, str(libdir))  # the stub then links the same libpython as the env's python
    env = {"LD_LIBRARY_PATH": ":".join(ld)}
    if env_root and (env_root / "bin" / "python3").exists():
        env["PATH"] = str(env_root / "bin")
    stub = ts / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"the python backend in {ts} has no triton_python_backend_stub ({SETUP_HINT})")
    return TritonRuntime(binary=binary, backend_dir=ts / "backends", env=env, python_env=env_root)


def find_runtime(tritonserver: str | os.PathLike | None = None) -> TritonRuntime:
    """The given tritonserver (with its wheel layout if it has one), else the bundled .venv-serve one."""
    if tritonserver is not None:
        binary = Path(tritonserver).expanduser().resolve()
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise ServeError(f"tritonserver not found or not executable: {tritonserver}")
        wheel = _wheel_runtime(binary)
        if wheel is not None:
            return wheel
        backends = binary.parent.parent / "backends"  # /opt/tritonserver/{bin,backends} in NVIDIA's images
        return TritonRuntime(binary=binary, backend_dir=backends if backends.is_dir() else None)
    for env in _candidates():
        found = sorted(env.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
        if found:
            return _wheel_runtime(found[-1]) or TritonRuntime(binary=found[-1], backend_dir=None)
    where = ", ".join(str(c) for c in _candidates())
    raise ServeError(f"no tritonserver found in {where} ({SETUP_HINT}, or pass --tritonserver PATH)")
