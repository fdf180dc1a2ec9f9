"""Rewrites a .cu file into C++ for cuda_emu (tools/cuda_emu/include/cuda_emu.h): the two CUDA-only syntaxes
become calls of the emulator, everything else stays as written (line numbers too, so that compiler messages
point into the .cu file).

    k<args><<<grid, block, smem, stream>>>(...)  ->  ::cuda_emu::launch(k<args>, grid, block, smem, stream)(...)
    extern __shared__ __align__(n) T name[];     ->  T* name = reinterpret_cast<T*>(::cuda_emu::dynamic_shared());
    __shared__ T name[dims];                     ->  using name_emu_t = T[dims];
                                                     auto& name = ::cuda_emu::block_shared<name_emu_t, __LINE__>();

CUDA-only tokens inside comments are spelled apart first, so that no rewrite matches there.

Usage: rewrite_cu.py IN.cu OUT.cc
"""

import re
import sys

# A kernel name, optionally with template arguments without nested brackets, then the launch brackets.
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([^;\[\]]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([^;=\[\]\n]+?)\s+(\w+)\s*((?:\[[^\]\n]+\]\s*)*);")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _defuse(comment: re.Match) -> str:
    """A comment with the CUDA-only tokens spelled out, so that no rewrite matches inside it."""
    return comment[0].replace("<<<", "<< <").replace(">>>", "> >>").replace("__shared__", "__ shared__")


def rewrite(source: str, path: str) -> str:
    out = _COMMENT.sub(_defuse, source)
    out = _LAUNCH.sub(lambda m: f"::cuda_emu::launch({m[1]}, {m[2]})(", out)
    out = _EXTERN_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::cuda_emu::dynamic_shared());",
                             out)
    # (the alias keeps a '>' inside the array bound out of a template argument list)
    out = _SHARED.sub(lambda m: f"using {m[2]}_emu_t = {m[1]}{m[3].strip()}; "
                                f"auto& {m[2]} = ::cuda_emu::block_shared<{m[2]}_emu_t, __LINE__>();", out)
    for token in ("<<<", ">>>", "__shared__"):
        if token in out:
            line = out[: out.index(token)].count("\n") + 1
            raise SystemExit(f"{path}:{line}: cuda_emu cannot rewrite this use of {token}")
    return f'#line 1 "{path}"\n{out}'


def main() -> None:
    src, dst = sys.argv[1:3]
    with open(src) as f:
        text = rewrite(f.read(), src)
    with open(dst, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
