#!/usr/bin/env bash
# Create .venv and install mddnet with its tested torch pair. Offline-safe: needs only the package
# registries. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# The torch/torchvision pair must match, or torchvision fails to import (timm needs it). The pair
# is installed before the package so that pip never resolves another torch for it.
case "$(uname -m)" in
  aarch64 | arm64) TORCH_PAIR=("torch==2.9.1" "torchvision==0.24.1") ;;
  *) TORCH_PAIR=("torch==2.14.1" "torchvision==0.29.1") ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing ${TORCH_PAIR[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TORCH_PAIR[@]}"
echo "[setup] installing mddnet[dev]"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
"$VENV/bin/python" -c "import torch, torchvision, timm, mddnet; print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'mddnet', mddnet.__version__)"
