#!/usr/bin/env bash
# Create .venv (if missing) and install p3b-deploy with its dev extra.
# --serve: also install the serving runtime (tritonserver + python backend) in .venv-serve/,
#          see scripts/setup_serve.sh.
# On x86_64 torch 2.14.1 + torchvision 0.29.1 are pinned (a local copy on our machines; the
# same wheels carry CUDA on GPU machines). Set P3B_SKIP_TORCH=1 to keep a torch you installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SERVE=0
for arg in "$@"; do
  case "$arg" in
    --serve) SERVE=1 ;;
    *) echo "usage: bash scripts/setup.sh [--serve]" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip_install() {  # quiet pip; drop this machine's harmless "Location ... is ignored" index warnings
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v -E "^WARNING: Location|^\s*$" >&2)
}
if [ -z "${P3B_SKIP_TORCH:-}" ] && ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    x86_64) echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"; pip_install torch==2.14.1 torchvision==0.29.1 ;;
    aarch64|arm64) echo "[setup] installing torch 2.9.1 + torchvision 0.24.1"; pip_install torch==2.9.1 torchvision==0.24.1 ;;
    *) echo "[setup] unknown machine $(uname -m): installing torch from PyPI"; pip_install torch torchvision ;;
  esac
fi
echo "[setup] installing p3b-deploy (editable) with dev extras"
pip_install -e '.[dev]'
echo "[setup] ready: $(.venv/bin/p3b-deploy --version)"
if [ "$SERVE" = 1 ]; then
  bash scripts/setup_serve.sh
fi
