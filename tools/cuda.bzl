"""cuda_library: a plain CUDA shared library (raw pointers and a stream, no libtorch).

Compiled by nvcc for sm_80 and sm_90 with PTX for compute_90, linked with the static CUDA
runtime so that it loads on any machine (without a GPU, cudaGetDeviceCount reports no driver).
Where nvcc is absent (or --repo_env=NVCC=none) the targets are incompatible: SKIPPED, not failed.
"""

load("@local_cuda//:defs.bzl", "CUDA_COMPATIBLE", "NVCC")

CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]

def cuda_library(name, srcs, hdrs = [], copts = [], **kwargs):
    """Builds lib<name>.so from .cu sources; hdrs are headers they include (paths from the workspace root)."""
    objs = []
    for src in srcs:
        obj = "_%s_%s.o" % (name, src.replace("/", "_").replace(".cu", ""))
        native.genrule(
            name = obj + "_nvcc",
            srcs = [src] + hdrs,
            outs = [obj],
            cmd = " ".join([
                NVCC or "false",
                "-O3 -std=c++17 -Xcompiler -fPIC -I. --expt-relaxed-constexpr",
                " ".join(CUDA_ARCH_FLAGS + copts),
                "-c $(location %s) -o $@.nvcc.o" % src,
                # nvcc names its temporary files tmpxft_<pid>_<counter> and leaves that name in the object's
                # symbol table; the counter depends on which nvcc runs overlap. Strip it: same sources, same bytes.
                "&& objcopy --wildcard --strip-symbol='tmpxft_*' $@.nvcc.o $@ && rm $@.nvcc.o",
            ]),
            target_compatible_with = CUDA_COMPATIBLE,
            tags = ["cuda"],
        )
        objs.append(obj)
    native.cc_library(
        name = name + "_objs",
        srcs = objs,
        alwayslink = 1,
        target_compatible_with = CUDA_COMPATIBLE,
        linkstatic = 1,
    )
    native.cc_binary(
        name = "lib%s.so" % name,
        deps = [":" + name + "_objs", "@local_cuda//:cudart_static"],
        linkshared = 1,
        linkopts = ["-ldl", "-lrt", "-lpthread"],
        target_compatible_with = CUDA_COMPATIBLE,
        tags = ["cuda"],
        **kwargs
    )
