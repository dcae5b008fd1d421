#!/usr/bin/env bash
# ExecuTorch (XNNPACK .pte lowering + its Python runtime) in .venv-edge/, next to .venv.
# executorch 1.5.1 (PyPI) declares no torch requirement but is built for a matching torch; it
# imports and lowers with this project's torch 2.14.1. To keep .venv's torch untouched, .venv-edge
# holds only executorch + torchao (+ three small deps) and reads everything else (torch, timm,
# p3b_deploy) from .venv through a .pth file that adds .venv's site-packages as a site dir (so its
# own .pth files, p3b-deploy's editable install among them, apply too). Run scripts/setup.sh first.
# LiteRT: litert-torch 0.10 (torch model -> .tflite; needs torch < 2.15; pulls in jax, transformers,
# ai-edge-quantizer and pins typing_extensions < 4.13 inside .venv-edge only, which torch 2.14 and
# executorch accept) and ai-edge-litert 2.3 (the runtime: numpy + flatbuffers, no torch). They add
# about 950 MB to .venv-edge and take about a minute to install; skipped when already at the pins.
# Then: .venv-edge/bin/python -m p3b_deploy export ... --format executorch|litert / bench --providers executorch|litert
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first (.venv is missing)" >&2; exit 2; }
if [ ! -x .venv-edge/bin/python ]; then
  echo "[setup-edge] creating .venv-edge"
  .venv/bin/python -m venv .venv-edge
fi
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
EDGE_SITE=$(.venv-edge/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$SITE')" > "$EDGE_SITE/p3b_main_venv.pth"
.venv-edge/bin/python -m pip install --disable-pip-version-check -q --no-deps \
  "executorch==1.5.1" "torchao>=0.18,<0.19" flatbuffers ruamel.yaml tabulate \
  2> >(grep -v -E "^WARNING: Location|^\s*$" >&2)
LITERT_TORCH=0.10.0 AI_EDGE_LITERT=2.3.0
have() { .venv-edge/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if ! have litert-torch "$LITERT_TORCH" || ! have ai-edge-litert "$AI_EDGE_LITERT"; then
  echo "[setup-edge] installing litert-torch $LITERT_TORCH + ai-edge-litert $AI_EDGE_LITERT (about 950 MB)"
  # pip reports executorch's undeclared extras (coremltools, hydra, ...) as conflicts: not needed here
  .venv-edge/bin/python -m pip install --disable-pip-version-check -q \
    "litert-torch==$LITERT_TORCH" "ai-edge-litert==$AI_EDGE_LITERT" 2>&1 \
    | grep -v -E "^WARNING: Location|^\s*$|dependency resolver|executorch .* requires|^ERROR: pip's" >&2 || true
fi
.venv-edge/bin/python - <<'PY'
import importlib.metadata as m
import ai_edge_litert.interpreter, executorch.runtime, litert_torch, p3b_deploy, torch
print("[setup-edge] ready: executorch", m.version("executorch"), "+ litert-torch", m.version("litert-torch"),
      "+ ai-edge-litert", m.version("ai-edge-litert"), "with torch", torch.__version__)
PY
