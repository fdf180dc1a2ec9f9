#!/usr/bin/env bash
# Fetches (from PyPI, on this machine) the wheels tools/gpu_check.sh installs on a lent GPU machine, which
# reaches no package index: liger-kernel, for the loss benchmark's comparison only (no dependency of
# codex_ml). They land in .whl/ (git-ignored); pass carry=[".whl"] with the device run.
#   usage: tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl liger-kernel==0.8.5
ls -l .whl
