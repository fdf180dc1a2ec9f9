"""codex_area: one area of the codex_ml package as a py_library; py_pytest: a py_test that runs pytest on its
sources; gpu_pytest: one that needs a CUDA device; codex_binary: a command."""

load("@local_gpu//:defs.bzl", "GPU_COMPATIBLE")

# The areas of python/codex_ml, each a py_library //python:<area> (codex_area) and a lint target //:lint_<area>.
CODEX_AREAS = ["checkpoint", "cli", "data", "eval", "models", "ops", "tokenization", "tracking", "training"]

def codex_area(name, deps = [], exclude = [], data = []):
    """python/codex_ml/<name>/ as the py_library `name` (every file of the folder but `exclude`, names in it).

    Every area depends on //python:base (codex_ml/__init__.py, the version, _files, _hub). `deps` are the areas
    its modules import: the arrows of docs/architecture.md, which Bazel keeps one-way (a cycle fails to build).
    """
    native.py_library(
        name = name,
        srcs = native.glob(
            ["codex_ml/%s/**/*.py" % name],
            exclude = ["codex_ml/%s/%s" % (name, f) for f in exclude],
        ),
        deps = deps + [":base"],
        data = data,
    )

def py_pytest(name, srcs, args = [], slow = [], tags = [], **kwargs):
    """A pytest test target. `srcs` are test files; `args` are extra pytest flags; the other attributes (`deps`,
    `data`, `size`, `env`, ...) are py_test's.

    `deps` names the //python areas the test imports (//python:data, //python:models, ...), not the whole
    package, so that an edit reruns only the tests that can see it. A test that runs a command in a subprocess
    depends on //python:codex_ml (and is tagged `e2e`).

    `slow`: pytest -k terms (test function names, or parameter ids such as "triton") of the tests too slow for the
    inner loop (`bazel test //... --test_tag_filters=-e2e`). They run in a second target, `<name>_slow`, tagged
    `e2e`, and not in this one: `bazel test //...` still runs every test once.
    """
    if slow:
        selection = " or ".join(slow)  # quoted: Bazel splits `args` like a shell
        _pytest(name + "_slow", srcs, args + ["-k", "'%s'" % selection], tags + ["e2e"], **kwargs)
        args = args + ["-k", "'not (%s)'" % selection]
    _pytest(name, srcs, args, tags, **kwargs)

def _pytest(name, srcs, args, tags, **kwargs):
    native.py_test(
        name = name,
        srcs = srcs + ["//tools:pytest_main.py"],
        main = "//tools:pytest_main.py",
        args = args + ["$(location %s)" % s for s in srcs],
        python_version = "PY3",
        tags = tags,
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
