"""Compiles Triton kernels ahead of time for sm_80 and sm_90, with no GPU present.

Usage: triton_aot_check.py [--triton_site=FILE] MODULE [MODULE ...]. Each module defines `aot_specs()`, a list of
(kernel, signature, constexprs) or (kernel, signature, constexprs, options) tuples, options being the launch
options the kernel runs with (num_warps, num_stages; Triton's defaults where absent). Each is compiled for every
target as a GPU launch compiles it: those options, and pointer arguments 16-byte aligned (as PyTorch allocates
tensors; Triton specializes on it, and only aligned loads are vectorized and pipelined). The PTX and cubin are
checked to be for that architecture and the shared memory to fit the chip's limit per block. --triton_site names
a file holding the site-packages folder of another Triton release (tools/triton_venv.bzl): that folder goes first
on sys.path, so that release compiles the kernels (the line "triton X from PATH" says which one did). Exit status
1 if any kernel fails the check.
"""

import argparse
import os
import sys
import tempfile

# The interpreter replaces @triton.jit functions with Python ones: compilation needs the real thing.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ.get("TEST_TMPDIR", tempfile.mkdtemp()), "triton"))

TARGETS = (80, 90)
# The most shared memory one block may use (opt-in dynamic limit): A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


def aligned_pointers(fn, signature: dict) -> dict:
    """Triton's attrs marking every pointer argument of `signature` 16-byte aligned, keyed by argument position."""
    return {(fn.arg_names.index(arg),): [["tt.divisibility", 16]]
            for arg, kind in signature.items() if kind.startswith("*")}


def check_module(name: str) -> list[str]:
    """Compiles every spec of module `name` for every target; returns the failures."""
    import importlib

    specs = importlib.import_module(name).aot_specs()
    if not specs:
        return [f"{name}: aot_specs() is empty"]
    return check_specs(name, specs)


def check_specs(name: str, specs: list[tuple]) -> list[str]:
    """Compiles every (kernel, signature, constexprs[, options]) spec for every target; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for fn, signature, constexprs, *rest in specs:
        options = rest[0] if rest else {}
        for capability in TARGETS:
            label = f"{name}.{fn.__name__} sm_{capability} {next(iter(signature.values()))} {constexprs} {options}"
            try:
                source = ASTSource(fn, signature, constexprs, aligned_pointers(fn, signature))
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(options))
                ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
                shared, limit = compiled.metadata.shared, SHARED_MEMORY_LIMIT[capability]
                if f".target sm_{capability}" not in ptx:
                    failures.append(f"{label}: PTX is not for sm_{capability}")
                elif not cubin:
                    failures.append(f"{label}: empty cubin")
                elif shared > limit:
                    failures.append(f"{label}: needs {shared} bytes of shared memory, more than the {limit} of "
                                    f"sm_{capability}: use fewer stages or smaller tiles")
                else:
                    print(f"ok   {label}: {len(cubin)} bytes of cubin, {shared} bytes of shared memory")
            except Exception as err:  # report every kernel, not only the first failure
                failures.append(f"{label}: {type(err).__name__}: {err}")
    return failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton_site", help="file holding the site-packages folder of the Triton to compile with")
    parser.add_argument("modules", nargs="+")
    args = parser.parse_args(argv)
    site = None
    if args.triton_site:
        with open(args.triton_site) as f:
            site = os.path.realpath(f.read().strip())
        sys.path.insert(0, site)
    import triton

    where = os.path.realpath(os.path.dirname(triton.__file__))
    print(f"triton {triton.__version__} from {where}")
    if site and not where.startswith(site + os.sep):
        print(f"FAIL triton was imported from {where}, not from {site}")
        return 1
    failures = [f for m in args.modules for f in check_module(m)]
    for failure in failures:
        print("FAIL " + failure)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
