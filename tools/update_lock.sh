#!/usr/bin/env bash
# Refreshes third_party/python/requirements.lock from requirements.in, with hashes.
# Needs PyPI (and this machine's local torch wheel). The next Bazel command rebuilds the venv.
set -euo pipefail
cd "$(dirname "$0")/../third_party/python"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
python3 -m venv "${tmp}/venv"
"${tmp}/venv/bin/pip" install --quiet pip-tools
"${tmp}/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
  --output-file requirements.lock requirements.in
echo "updated $(pwd)/requirements.lock; the next tools/bazel command rebuilds the environment"
