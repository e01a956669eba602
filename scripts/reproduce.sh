#!/usr/bin/env bash
# The README's first command: set up .venv, then regenerate results/ with `dvc repro`.
# Extra arguments go to `dvc repro` (e.g. a stage name, or --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # stages call python -m papermill from the venv
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # no model-hub lookups on the offline default
echo "[reproduce] dvc repro $*"
time .venv/bin/dvc repro "$@"
