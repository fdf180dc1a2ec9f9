"""py_pytest: a py_test that runs pytest on its sources, with codex_ml importable; gpu_pytest: one that needs a
CUDA device; codex_binary: a command."""

load("@local_gpu//:defs.bzl", "GPU_COMPATIBLE")

def py_pytest(name, srcs, deps = [], data = [], args = [], size = "medium", env = {}, **kwargs):
    """A pytest test target. `srcs` are test files; `args` are extra pytest flags."""
    native.py_test(
        name = name,
        srcs = srcs + ["//tools:pytest_main.py"],
        main = "//tools:pytest_main.py",
        args = args + ["$(location %s)" % s for s in srcs],
        deps = deps + ["//python:codex_ml"],
        data = data,
        size = size,
        python_version = "PY3",
        env = env,
        **kwargs
    )

def gpu_pytest(name, tags = [], **kwargs):
    """A py_pytest that needs a CUDA device (tagged `gpu`).

    Where tools/cuda_configure.bzl finds no usable device (or --repo_env=CODEX_ML_GPU=0), the target is
    incompatible: `bazel test //...` reports it SKIPPED instead of running a file whose every test skips.
    """
    py_pytest(
        name = name,
        tags = tags + ["gpu"],
        target_compatible_with = GPU_COMPATIBLE,
        **kwargs
    )

def codex_binary(name, main, data = []):
    """A `bazel run` command whose entry point is one module of the codex_ml package (`main`, a path in python/)."""
    native.py_binary(
        name = name,
        srcs = [main],
        main = main,
        data = data,
        python_version = "PY3",
        deps = ["//python:codex_ml"],
    )
