"""torch_extension: a Python extension module of C++ ops registered with TORCH_LIBRARY.

The module (`<name>.so`) is importable: a generated PyInit stub gives Python a module, and
importing it runs the static TORCH_LIBRARY registrations, making torch.ops.<ns>.<op> callable.
RUNPATH finds torch/lib next to the package in an installed wheel (codex_ml/<package>/<name>.so, so one `..`
per folder of the package, plus codex_ml itself); in Bazel runfiles the _solib links do the same job.
"""

def torch_extension(name, srcs, hdrs = [], copts = [], deps = [], **kwargs):
    """Builds `<name>.so`, a Python module named `name`, from C++ sources using libtorch."""
    stub = "_%s_pyinit.cc" % name
    up = "/".join([".."] * (len(native.package_name().split("/")) + 1))
    native.genrule(
        name = name + "_pyinit",
        outs = [stub],
        cmd = """cat > $@ <<'EOF'
#include <Python.h>
// Importing the module loads the library, whose static initializers register the ops.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "%s", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&module); }
EOF""" % (name, name),
    )
    native.cc_binary(
        name = name + ".so",
        srcs = srcs + hdrs + [":" + stub],
        copts = ["-std=c++20", "-O3", "-fvisibility=hidden", "-fopenmp", "-Wno-unused-parameter"] + copts,
        linkopts = ["-fopenmp", "-Wl,-rpath,$$ORIGIN/%s/torch/lib" % up],
        linkshared = 1,
        deps = ["@pyenv//:libtorch", "@pyenv//:python_headers"] + deps,
        **kwargs
    )
