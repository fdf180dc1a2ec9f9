"""Compiles Triton kernels ahead of time for sm_80 and sm_90, with no GPU present.

Usage: triton_aot_check.py MODULE [MODULE ...]. Each module defines `aot_specs()`, a list of
(kernel, signature, constexprs) triples; each is compiled for every target and the PTX and cubin
are checked to be for that architecture. Exit status 1 if any kernel fails to compile.
"""

import os
import sys
import tempfile

# The interpreter replaces @triton.jit functions with Python ones: compilation needs the real thing.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ.get("TEST_TMPDIR", tempfile.mkdtemp()), "triton"))

import importlib  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGETS = (80, 90)


def check_module(name: str) -> list[str]:
    """Compiles every spec of module `name` for every target; returns the failures."""
    module = importlib.import_module(name)
    specs = module.aot_specs()
    if not specs:
        return [f"{name}: aot_specs() is empty"]
    failures = []
    for fn, signature, constexprs in specs:
        for capability in TARGETS:
            label = f"{name}.{fn.__name__} sm_{capability} {sorted(signature.items())[:3]}..."
            try:
                source = ASTSource(fn, signature, constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
                ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
                if f".target sm_{capability}" not in ptx:
                    failures.append(f"{label}: PTX is not for sm_{capability}")
                elif not cubin:
                    failures.append(f"{label}: empty cubin")
                else:
                    print(f"ok   {label}: {len(cubin)} bytes of cubin")
            except Exception as err:  # report every kernel, not only the first failure
                failures.append(f"{label}: {type(err).__name__}: {err}")
    return failures


def main(modules: list[str]) -> int:
    failures = [f for m in modules for f in check_module(m)]
    for failure in failures:
        print("FAIL " + failure)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
