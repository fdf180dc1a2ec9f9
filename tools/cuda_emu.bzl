"""cuda_emu_library: the sources of a cuda_library compiled for the CPU by cuda_emu (tools/cuda_emu), for tests.

lib<name>.so exports the same C entry points as the CUDA library and runs its kernels on the host, so that the
CPU test suite executes the kernels themselves. It needs no nvcc and is never packaged.
"""

# -fno-strict-aliasing: kernels reinterpret 16-bit elements as 16-byte vectors, as CUDA code does.
# -fsanitize=alignment (trapping, no runtime library): a misaligned vector access stops the test.
CUDA_EMU_COPTS = [
    "-std=c++17",
    "-O2",
    "-fno-strict-aliasing",
    "-fsanitize=alignment",
    "-fsanitize-undefined-trap-on-error",
    "-Wno-unknown-pragmas",
    "-Wno-unused-parameter",
    "-Wno-unused-function",
]

def cuda_emu_library(name, srcs, hdrs = []):
    """Builds lib<name>.so from .cu sources (hdrs: the headers they include, paths from the workspace root)."""
    ccs = []
    for src in srcs:
        cc = "_%s_%s.cc" % (name, src.replace("/", "_").replace(".cu", ""))
        native.genrule(
            name = cc + "_rewrite",
            srcs = [src],
            outs = [cc],
            cmd = "$(location //tools/cuda_emu:rewrite_cu) $< $@",
            tools = ["//tools/cuda_emu:rewrite_cu"],
        )
        ccs.append(cc)
    native.cc_binary(
        name = "lib%s.so" % name,
        srcs = ccs + hdrs,
        copts = CUDA_EMU_COPTS,
        linkshared = 1,
        testonly = 1,
        deps = ["//tools/cuda_emu"],
    )
