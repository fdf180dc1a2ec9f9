#!/usr/bin/env bash
# Refreshes third_party/python/requirements.lock from requirements.in, with hashes.
# Needs PyPI, and PyTorch's CPU wheel index for torch (or a local mirror holding it, or
# CODEX_ML_TORCH_INDEX): tools/pip_sources.py picks the sources, as for the environment itself.
# The lock names no index and no local path. The next Bazel command rebuilds the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
sources=()
while IFS= read -r line; do sources+=("${line}"); done \
  < <(python3 tools/pip_sources.py args --lock third_party/python/requirements.in)
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
# pip's own configuration stays out of it, as in tools/pip_sources.py.
while IFS= read -r var; do unset "${var}"; done < <(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p')
export PIP_CONFIG_FILE=/dev/null
python3 -m venv "${tmp}/venv"
"${tmp}/venv/bin/pip" install --quiet pip-tools
cd third_party/python
CUSTOM_COMPILE_COMMAND="tools/update_lock.sh" "${tmp}/venv/bin/pip-compile" --quiet --generate-hashes \
  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links "${sources[@]}" \
  --output-file requirements.lock requirements.in
if grep -nE '^-|file://|/opt/' requirements.lock; then
  echo "requirements.lock names an index or a local path (above): it must not" >&2
  exit 1
fi
echo "updated $(pwd)/requirements.lock; the next tools/bazel command rebuilds the environment"
