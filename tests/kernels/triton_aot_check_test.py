"""tools/triton_aot_check.py compiles a kernel as a GPU launch does: with the spec's launch options and pointers
16-byte aligned, and it fails a kernel whose shared memory exceeds the chip's.

The probe is a pipelined fp16 product of 128 x 128 tiles. Aligned, its loads are asynchronous copies staged in
shared memory, 64 KB per stage on sm_90 (32 KB on sm_80): at Triton's default 3 stages it fits both chips, at 4 it
fits neither. Unaligned, nothing is staged and any option fits, so the overflow is reported only when the check
passes both the options and the alignment.

TRITON_SITE_FILE (a runfiles path, as tools/triton_venv.bzl's site.txt) names another Triton release to run with:
//tests/kernels:triton36_aot_check_test checks the same with Triton 3.6.
"""

import importlib.util
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile the kernel, not interpret it (set before triton is imported)
RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
SITE = None
if os.environ.get("TRITON_SITE_FILE"):
    SITE = os.path.realpath((RUNFILES / os.environ["TRITON_SITE_FILE"]).read_text().strip())
    sys.path.insert(0, SITE)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_spec = importlib.util.spec_from_file_location("triton_aot_check", RUNFILES / "tools" / "triton_aot_check.py")
triton_aot_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(triton_aot_check)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(a_ptr + offs[:, None] * K + k + offs[None, :])
        b = tl.load(b_ptr + (k + offs[:, None]) * BLOCK + offs[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc.to(c_ptr.dtype.element_ty))


SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "constexpr", "BLOCK": "constexpr"}
CONSTEXPRS = {"K": 1024, "BLOCK": 128}


def test_the_triton_named_is_the_one_imported():
    where = os.path.realpath(os.path.dirname(triton.__file__))
    assert SITE is None or where.startswith(SITE + os.sep), (where, SITE)


def test_pointers_are_marked_aligned():
    assert triton_aot_check.aligned_pointers(_matmul_kernel, SIGNATURE) == {
        (0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


def test_a_spec_within_shared_memory_passes():
    assert triton_aot_check.check_specs("probe", [(_matmul_kernel, SIGNATURE, CONSTEXPRS, {"num_stages": 3})]) == []


def test_options_past_shared_memory_fail_on_every_target():
    failures = triton_aot_check.check_specs("probe", [(_matmul_kernel, SIGNATURE, CONSTEXPRS, {"num_stages": 4})])
    assert len(failures) == len(triton_aot_check.TARGETS), failures
    for failure, capability in zip(failures, triton_aot_check.TARGETS):
        limit = triton_aot_check.SHARED_MEMORY_LIMIT[capability]
        assert f"sm_{capability}" in failure and f"more than the {limit} of sm_{capability}" in failure, failure
