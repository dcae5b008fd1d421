#!/usr/bin/env bash
# Serving runtime for `p3b-deploy serve` and the serving tests, in its own environment .venv-serve/:
#   - tritonserver 2.51 + its python backend, from the `nvidia-pytriton` wheel (PyPI, installed
#     --no-deps: we use its bundled server binary, not its Python API);
#   - numpy<2 + onnxruntime for the python backend stub (the stub returns empty responses with
#     numpy 2, while the main .venv has numpy 2 — hence a second environment).
# The server is started with .venv-serve/bin first on PATH: the stub's embedded Python finds this
# environment through it. Run by `bash scripts/setup.sh --serve`; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
ENV=.venv-serve
PYTRITON_VERSION=0.7.0
if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
  echo "[setup --serve] the bundled tritonserver is built for Linux x86_64 only; skip serving here" >&2
  exit 1
fi
if [ ! -x "$ENV/bin/python" ]; then
  echo "[setup --serve] creating $ENV with $($PY --version)"
  "$PY" -m venv "$ENV"
fi
pip_install() {  # quiet pip; drop this machine's harmless "Location ... is ignored" index warnings
  "$ENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v -E "^WARNING: Location|^\s*$" >&2)
}
# Same onnxruntime release as the main environment when there is one, so server and local
# ONNX Runtime compute identical logits.
ORT_PIN=onnxruntime
if [ -x .venv/bin/python ]; then
  v=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || true)
  [ -n "$v" ] && ORT_PIN="onnxruntime==$v"
fi
echo "[setup --serve] installing nvidia-pytriton $PYTRITON_VERSION (server binary only), numpy<2, $ORT_PIN"
pip_install "numpy<2" "$ORT_PIN"
pip_install --no-deps "nvidia-pytriton==$PYTRITON_VERSION"  # last: pip checks no deps with --no-deps
# The python backend needs the stub built for this Python next to libtriton_python.so.
read -r PYVER SITE LIBDIR < <("$ENV/bin/python" -c "import sys, sysconfig; print(f'{sys.version_info[0]}.{sys.version_info[1]}', sysconfig.get_paths()['purelib'], sysconfig.get_config_var('LIBDIR'))")
TS="$SITE/pytriton/tritonserver"
STUB="$TS/python_backend_stubs/$PYVER/triton_python_backend_stub"
if [ ! -f "$STUB" ]; then
  echo "[setup --serve] nvidia-pytriton $PYTRITON_VERSION has no python backend stub for Python $PYVER" >&2
  exit 1
fi
cp "$STUB" "$TS/backends/python/triton_python_backend_stub"
# The stub links libpython$PYVER.so: it must resolve (from this Python's LIBDIR or the system).
missing=$(LD_LIBRARY_PATH="$LIBDIR:$SITE/nvidia_pytriton.libs" ldd "$TS/backends/python/triton_python_backend_stub" "$TS/bin/tritonserver" | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "[setup --serve] missing shared libraries: $(echo "$missing" | awk '{print $1}' | sort -u | tr '\n' ' ')(libpython: a Python built with --enable-shared, or apt-get install libpython$PYVER)" >&2
  exit 1
fi
echo "[setup --serve] ready: $TS/bin/tritonserver (python backend for Python $PYVER)"
