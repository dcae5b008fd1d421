#!/usr/bin/env bash
# GPU check: every GPU benchmark path (torch CUDA fp32 + AMP fp16/bf16, ONNX Runtime CUDA EP,
# TensorRT EP if present) on a dense and a slim model, in one go, in under 8 minutes.
# Writes benchmarks/results/gpu/report.{json,md,csv} + latency.png.
#
#   benchmarks/gpu_check.sh            # on a CUDA machine (no internet needed once packages exist)
#   benchmarks/gpu_check.sh --dry-run  # anywhere: checks the script, the imports and lists the phases
#
# Works from a fresh copy of the repo: uses .venv/bin/python if present, else python3; installs
# the package (pip install -e . --no-deps) and torch / onnxruntime-gpu only when they are missing.
# Without a CUDA device it stops with an error and exit code 1 (never a silent "pass").
set -euo pipefail

DRY=0
OUT=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --out=*) OUT="${a#--out=}" ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $a (use --dry-run, --out=DIR)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null || { echo "error: no python ($PY) found" >&2; exit 1; }
echo "gpu_check: python $($PY -c 'import sys; print(sys.version.split()[0])') at $PY"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, installed or not
run() { if [[ $DRY == 1 ]]; then echo "would run: $*"; else echo "+ $*"; "$@"; fi; }
have() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" >/dev/null 2>&1; }

# 1. a GPU must be there before anything is installed (fail loudly, never a silent "pass")
if [[ $DRY == 0 ]]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU found (nvidia-smi missing or failing); gpu_check needs a CUDA machine" >&2
    exit 1
  fi
  nvidia-smi -L
fi

# 2. packages (installed only where missing)
have torch || run "$PY" -m pip install "torch==2.14.1" "torchvision==0.29.1"
have p3b_deploy || run "$PY" -m pip install -e . --no-deps
for mod in timm torch_pruning onnx onnxscript safetensors matplotlib; do
  have "$mod" || run "$PY" -m pip install "${mod//_/-}"
done
if [[ $DRY == 0 ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "error: torch cannot use the GPU (torch.cuda.is_available() is False; CPU-only torch build?)" >&2
    exit 1; }
fi
if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  # onnxruntime and onnxruntime-gpu share a module name: replace the CPU build (GPU machines only)
  run "$PY" -m pip uninstall -y onnxruntime
  run "$PY" -m pip install onnxruntime-gpu
fi

# 3. the check itself, bounded to 8 minutes
ARGS=()
[[ -n "$OUT" ]] && ARGS+=(--out "$OUT")
if [[ $DRY == 1 ]]; then
  "$PY" -m py_compile benchmarks/gpu_check.py benchmarks/latency_sparsity.py
  "$PY" benchmarks/gpu_check.py --dry-run "${ARGS[@]}"
  echo "gpu_check: dry run OK"
  exit 0
fi
START=$(date +%s)
timeout --signal=INT 470 "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
echo "gpu_check: finished in $(( $(date +%s) - START ))s"
