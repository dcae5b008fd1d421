#!/usr/bin/env bash
# ExecuTorch (XNNPACK .pte lowering + its Python runtime) in .venv-edge/, next to .venv.
# executorch 1.5.1 (PyPI) declares no torch requirement but is built for a matching torch; it
# imports and lowers with this project's torch 2.14.1. To keep .venv's torch untouched, .venv-edge
# holds only executorch + torchao (+ three small deps) and reads everything else (torch, timm,
# p3b_deploy) from .venv through a .pth file that adds .venv's site-packages as a site dir (so its
# own .pth files, p3b-deploy's editable install among them, apply too). Run scripts/setup.sh first.
# Then: .venv-edge/bin/python -m p3b_deploy export ... --format executorch / bench --providers executorch
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
.venv-edge/bin/python -c "import torch, executorch.runtime, p3b_deploy; print('[setup-edge] ready: executorch', \
__import__('importlib.metadata').metadata.version('executorch'), 'with torch', torch.__version__)"
