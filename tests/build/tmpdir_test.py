"""Tests write only under TEST_TMPDIR: a Triton kernel compiled in a test lands in a cache there, not in /tmp.

The kernel is compiled ahead of time for sm_80 (no GPU needed) in a child process that inherits the test's
environment, as any test's subprocess would.
"""

import os
import subprocess
import sys
from pathlib import Path

TEST_TMPDIR = Path(os.environ["TEST_TMPDIR"])
KERNEL_NAME = "tmpdir_probe_kernel"
KERNEL_SOURCE = f'''
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def {KERNEL_NAME}(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)


signature = {{"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}}
triton.compile(ASTSource({KERNEL_NAME}, signature, {{"BLOCK": 64}}), target=GPUTarget("cuda", 80, 32))
'''


def files_named(root: Path, name: str, max_depth: int, skip: Path) -> list[Path]:
    """Files called `name` under `root`, at most `max_depth` levels down, outside `skip`; unreadable folders pass."""
    found = []
    for folder, subfolders, files in os.walk(root, onerror=lambda _: None):
        here = Path(folder)
        if here == skip or len(here.relative_to(root).parts) >= max_depth:
            subfolders.clear()
        found += [here / f for f in files if f == name]
    return found


def test_compiled_triton_kernel_is_cached_under_test_tmpdir():
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    assert cache.is_relative_to(TEST_TMPDIR), cache
    script = TEST_TMPDIR / "compile_probe.py"
    script.write_text(KERNEL_SOURCE)
    result = subprocess.run([sys.executable, str(script)], env=dict(os.environ, TRITON_INTERPRET="0"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    cubins = files_named(cache, f"{KERNEL_NAME}.cubin", max_depth=4, skip=Path("/nonexistent"))
    assert cubins, f"no {KERNEL_NAME}.cubin under {cache}"
    # Triton's cache under /tmp (TRITON_CACHE_DIR there, or ~/.triton with HOME=/tmp) would hold the same file.
    assert not files_named(Path("/tmp"), f"{KERNEL_NAME}.cubin", max_depth=5, skip=TEST_TMPDIR)
