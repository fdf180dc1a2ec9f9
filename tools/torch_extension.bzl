"""torch_extension: a Python extension module of C++ ops registered with STABLE_TORCH_LIBRARY.

The module (`<name>.so`) is importable: a generated PyInit stub gives Python a module, and
importing it runs the static STABLE_TORCH_LIBRARY registrations, making torch.ops.<ns>.<op> callable.
The sources see LibTorch's stable ABI only (TORCH_STABLE_ONLY; ATen headers are a compile error) and target
STABLE_ABI_FLOOR, so the module loads in that torch release and the later ones (docs/using-the-wheel.md).
RUNPATH finds torch/lib next to the package in an installed wheel (codex_ml/<package>/<name>.so, so one `..`
per folder of the package, plus codex_ml itself); in Bazel runfiles the _solib links do the same job.
"""

# The oldest torch release whose stable ABI the extensions target, as TORCH_TARGET_VERSION (major << 56 | minor << 48):
# 2.13. The wheel's torch requirement starts there (python/BUILD.bazel).
STABLE_ABI_FLOOR = "0x020d000000000000"

def torch_extension(name, srcs, hdrs = [], copts = [], deps = [], **kwargs):
    """Builds `<name>.so`, a Python module named `name`, from C++ sources using libtorch."""
    stub = "_%s_pyinit.cc" % name
    up = "/".join([".."] * (len(native.package_name().split("/")) + 1))
    native.genrule(
        name = name + "_pyinit",
        outs = [stub],
        cmd = """cat > $@ <<'EOF'
// The stub is all the Python C API the module uses: on the stable Python ABI (abi3) from 3.11 on.
#define Py_LIMITED_API 0x030B0000
#include <Python.h>
// Importing the module loads the library, whose static initializers register the ops.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "%s", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&module); }
EOF""" % (name, name),
    )
    native.cc_binary(
        name = name + ".so",
        srcs = srcs + hdrs + [":" + stub],
        copts = [
            "-std=c++20",
            "-O3",
            "-fvisibility=hidden",
            "-fopenmp",
            "-Wno-unused-parameter",
            "-DTORCH_STABLE_ONLY",
            "-DTORCH_TARGET_VERSION=" + STABLE_ABI_FLOOR,
        ] + copts,
        linkopts = ["-fopenmp", "-Wl,-rpath,$$ORIGIN/%s/torch/lib" % up],
        linkshared = 1,
        deps = ["@pyenv//:libtorch", "@pyenv//:python_headers", "//kernels/common:stable"] + deps,
        **kwargs
    )
