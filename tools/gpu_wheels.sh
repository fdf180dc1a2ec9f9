#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (tools/gpu_wheels.txt: gin-config for the trainer, liger-kernel and
# cut-cross-entropy for the benchmarks' comparisons), hash-checked, for its Python 3.12, from the project's pip
# sources (tools/pip_sources.py: the local mirrors, then PyPI). tools/gpu_bundle.sh calls it for the bundle's
# wheels/; tools/gpu_check.sh installs them on the GPU machine.
#   usage: tools/gpu_wheels.sh [DIR]   (default .gpu_bundle/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu_bundle/wheels}"
mapfile -t sources < <(python3 tools/pip_sources.py args --lock third_party/python/requirements.lock)
# pip names each local mirror it looks in for a package the mirror lacks: not a problem, so not shown.
python3 -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any "${sources[@]}" \
  -d "${dir}" -r tools/gpu_wheels.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
ls "${dir}"
