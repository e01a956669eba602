#!/usr/bin/env bash
# Refresh the locks after a change of pyproject.toml's dependencies (or to take newer releases):
#   bash requirements/compile.sh            # keep the locked versions where pyproject allows them
#   bash requirements/compile.sh --upgrade  # take the newest versions pyproject allows
# It resolves against PyPI, uv's default index (metadata only, no wheel downloads), so that the
# locks hold PyPI's hashes and install anywhere; each lock's header is the exact command that
# made it. Then run `bash scripts/setup.sh` and the tests, and commit pyproject.toml with
# requirements/.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
[ -x "$UV" ] || UV=uv

for platform in x86_64 aarch64; do
  lock="requirements/linux-$platform-py311.txt"
  command=(uv pip compile pyproject.toml --extra dev --extra pipeline
    --constraint "requirements/torch-linux-$platform.txt"
    --python-version 3.11 --python-platform "$platform-unknown-linux-gnu"
    --generate-hashes --output-file "$lock")
  # --no-config and no UV_* index settings: the lock does not depend on this machine's mirrors.
  env -u UV_INDEX_URL -u UV_EXTRA_INDEX_URL -u UV_FIND_LINKS -u UV_INDEX -u UV_DEFAULT_INDEX \
    "$UV" "${command[@]:1}" --no-config --custom-compile-command "${command[*]}" --quiet "$@"
  note='#    (both locks at once: bash requirements/compile.sh; installed by scripts/setup.sh)'
  sed -i "2a $note" "$lock"
done
