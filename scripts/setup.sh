#!/usr/bin/env bash
# Create .venv and install the locked environment: requirements/linux-<arch>-py311.txt (exact
# versions with hashes of the runtime dependencies and the dev and pipeline extras, the tested
# torch pair included: torch==2.14.1 torchvision==0.29.1 on x86_64, torch==2.9.1
# torchvision==0.24.1 on aarch64), then mddnet itself, editable, without deps. Installs with uv,
# which it first puts into the venv with pip (pinned and hash-checked from the same lock).
# Offline-safe: needs only the package registries. Idempotent: a second run installs nothing new.
# The lock is refreshed by `bash requirements/compile.sh` (see its header).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

case "$(uname -m)" in
  aarch64 | arm64) LOCK=requirements/linux-aarch64-py311.txt ;;
  *) LOCK=requirements/linux-x86_64-py311.txt ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "[setup] warning: $LOCK is for Python 3.11;" \
    "$VENV has $("$VENV/bin/python" --version)" >&2
fi

# uv, at the version the lock pins (it has no dependencies), hash-checked by pip.
uv_version=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$LOCK")
if [ "$("$VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$uv_version" ]; then
  echo "[setup] installing uv $uv_version into $VENV with pip"
  uv_requirement=$(mktemp)
  trap 'rm -f "$uv_requirement"' EXIT
  awk '/^uv==/ { found = 1 } found { print } found && !/\\$/ { exit }' "$LOCK" >"$uv_requirement"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --require-hashes -r "$uv_requirement"
fi

# uv does not read pip's configuration: hand it pip's extra indexes and find-links (a local
# mirror, where a machine has one), searched before PyPI for each locked version. The lock's
# hashes check every file, wherever it comes from.
pip_setting() {  # a pip setting from the environment or pip's config files, space-separated
  local variable="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  echo "${!variable:-$("$VENV/bin/python" -m pip config get "global.$1" 2>/dev/null || true)}" |
    tr '\n' ' ' | xargs
}
extra_index_urls=$(pip_setting extra-index-url)
find_links=$(pip_setting find-links)
if [ -z "${UV_EXTRA_INDEX_URL:-}" ] && [ -n "$extra_index_urls" ]; then
  export UV_EXTRA_INDEX_URL=$extra_index_urls  # space-separated, as pip's
fi
if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "$find_links" ]; then
  export UV_FIND_LINKS=${find_links// /,}  # comma-separated for uv
fi
export UV_INDEX_STRATEGY=${UV_INDEX_STRATEGY:-unsafe-first-match}

echo "[setup] installing $LOCK"
# Where PYTHONDONTWRITEBYTECODE is set, Python never writes .pyc files itself and every start
# would compile torch's modules again (its import twice as slow): compile them once here, as pip
# does (about 40 s on 2 cores). Elsewhere Python writes them at the first import.
compile=()
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then compile=(--compile-bytecode); fi
"$VENV/bin/uv" pip install --python "$VENV/bin/python" ${compile[@]+"${compile[@]}"} \
  --require-hashes -r "$LOCK"
# uv reinstalls a local directory every time: skip it while the editable install is this
# checkout's and pyproject.toml is unchanged since.
stamp="$VENV/.mddnet-editable"
wanted="$(pwd) $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] ||
  ! "$VENV/bin/uv" pip show --python "$VENV/bin/python" --quiet mddnet >/dev/null 2>&1; then
  echo "[setup] installing mddnet (editable, no deps)"
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -e .
  echo "$wanted" >"$stamp"
fi
"$VENV/bin/python" -c "import torch, torchvision, timm, mddnet; print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'mddnet', mddnet.__version__)"
