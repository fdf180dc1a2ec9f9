#!/usr/bin/env bash
# Fetches (from PyPI, on a machine with network access) the wheels tools/gpu_check.sh installs on a GPU machine
# that may reach no package index: liger-kernel, for the benchmarks' comparisons only (no dependency of
# codex_ml). They land in .whl/ (git-ignored); copy .whl/ with the checkout to the GPU machine.
#   usage: tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl liger-kernel==0.8.5
ls -l .whl
