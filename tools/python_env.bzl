"""Repository rule: the locked Python environment, registered as the Python toolchain.

Builds a virtual environment from a hash-locked requirements file and writes a BUILD file with
  - the py_runtime / toolchain every py_binary and py_test runs on;
  - cc targets for native code built against it: Python headers and libtorch, with the C++11 ABI flag
    read from the installed torch (never assumed);
and a defs.bzl with the Python and torch versions (the wheel's tags and requirements).
tools/pip_sources.py decides where pip downloads the locked files from: local mirrors where the machine has
them, else PyPI and PyTorch's CPU wheel index (--repo_env=CODEX_ML_TORCH_INDEX=<url> names another).
The repository is re-fetched when the lock, tools/pip_sources.py, this .bzl file or CODEX_ML_TORCH_INDEX change.
"""

_INFO_SCRIPT = """
import json, os, sys, sysconfig
import torch
from torch.utils import cpp_extension
print(json.dumps({
    "python_include": sysconfig.get_paths()["include"],
    "torch_includes": cpp_extension.include_paths(),
    "torch_lib": os.path.join(os.path.dirname(torch.__file__), "lib"),
    "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI),
    "torch_version": torch.__version__,
    "python_version": "%d.%d" % sys.version_info[:2],
}))
"""

_BUILD_TEMPLATE = """
package(default_visibility = ["//visibility:public"])

load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

exports_files(["requirements.lock"])

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{interpreter}",
    python_version = "PY3",
    # The launcher stub runs on the venv too (no `python` need exist on the machine's PATH).
    stub_shebang = "#!{interpreter}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "python_toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)

cc_library(
    name = "python_headers",
    hdrs = glob(["python_include/**/*.h"]),
    includes = ["python_include"],
)

cc_library(
    name = "torch_headers",
    hdrs = glob(["torch_include/**/*.h", "torch_include/**/*.hpp", "torch_include/**/*.cuh"]),
    includes = ["torch_include", "torch_include/torch/csrc/api/include"],
    # torch's headers need C++20, and the ABI flag must match the installed libtorch.
    defines = ["_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"],
)

[cc_import(
    name = lib,
    shared_library = "torch_lib/lib" + lib + ".so",
) for lib in ["c10", "torch", "torch_cpu"]]

cc_library(
    name = "libtorch",
    deps = [":torch_headers", ":c10", ":torch", ":torch_cpu"],
)
"""

def _run(ctx, args, what, timeout = 3600, environment = {}):
    # Quiet: pip and the probes print only when something fails (below).
    result = ctx.execute(args, timeout = timeout, quiet = True, environment = environment)
    if result.return_code != 0:
        fail("python_env: %s failed (exit %d):\n%s\n%s" % (what, result.return_code, result.stdout, result.stderr))
    return result.stdout

def _python_env_impl(ctx):
    lock = ctx.path(ctx.attr.requirements)
    ctx.symlink(lock, "requirements.lock")
    python = ctx.which(ctx.attr.python)
    if not python:
        fail("python_env: no '%s' on PATH; install Python %s" % (ctx.attr.python, ctx.attr.python_version))

    # pyenv shims are scripts: resolve the real interpreter so the venv does not depend on them.
    real = _run(ctx, [python, "-c", "import os, sys; print(os.path.realpath(sys.executable))"], "finding the interpreter").strip()
    version = _run(ctx, [real, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], "reading the Python version").strip()
    if version != ctx.attr.python_version:
        fail("python_env: %s is Python %s, the lock is for Python %s" % (real, version, ctx.attr.python_version))

    # venv and pip unpack into TMPDIR: keep that inside this repository, not in the machine's /tmp.
    tmp = ctx.path("tmp")
    ctx.execute(["mkdir", "-p", str(tmp)])
    env = {"TMPDIR": str(tmp)}
    ctx.report_progress("creating the virtual environment")
    _run(ctx, [real, "-m", "venv", "venv"], "python -m venv", environment = env)
    venv_python = str(ctx.path("venv/bin/python3"))
    ctx.report_progress("installing the locked requirements (first time: a few minutes)")
    _run(ctx, [
        real, str(ctx.path(ctx.attr._pip_sources)), "install", "--lock", str(lock), "--python", venv_python,
    ], "pip install -r requirements.lock", environment = env)
    ctx.delete(tmp)

    info = json.decode(_run(ctx, [venv_python, "-c", _INFO_SCRIPT], "reading the torch build"))
    ctx.symlink(info["python_include"], "python_include")
    ctx.symlink(info["torch_includes"][0], "torch_include")
    ctx.symlink(info["torch_lib"], "torch_lib")
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    ctx.file("BUILD", _BUILD_TEMPLATE.format(
        interpreter = venv_python,
        cxx11_abi = info["cxx11_abi"],
    ))
    ctx.file("defs.bzl", "\n".join([
        '"""Facts of the locked Python environment, read when it was built."""',
        "PYTHON_VERSION = \"%s\"" % info["python_version"],
        "TORCH_VERSION = \"%s\"" % info["torch_version"],
        "",
    ]))

python_env = repository_rule(
    implementation = _python_env_impl,
    attrs = {
        "requirements": attr.label(mandatory = True, allow_single_file = True),
        "python": attr.string(default = "python3"),
        "python_version": attr.string(default = "3.11"),
        "_pip_sources": attr.label(default = Label("//tools:pip_sources.py"), allow_single_file = True),
    },
    environ = ["CODEX_ML_TORCH_INDEX"],
    doc = "A virtual environment built from a hash-locked requirements file.",
)
