#!/bin/sh
echo "bazel coverage is not available offline: measure Python coverage with coverage.py inside a test." >&2
exit 1
