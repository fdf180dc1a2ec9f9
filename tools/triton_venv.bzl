"""Repository rule: a throwaway virtual environment with one other Triton release, to compile the kernels against.

The GPU machines the kernels run on may have another Triton than the locked one (e.g. 3.6 beside the lock's 3.9).
This rule installs that release alone (hash-pinned, no dependencies, from the sources tools/pip_sources.py
chooses: the local mirrors, then PyPI) into a venv of its own, and writes site.txt, the path of its
site-packages. tools/triton.bzl's triton_aot_test(triton = "@<name>") puts that folder first on sys.path of
tools/triton_aot_check.py (torch and the rest still come from the locked environment), so every kernel is
compiled ahead of time by that Triton, for sm_80 and sm_90, with no GPU.
"""

def _run(ctx, args, what, environment = {}):
    result = ctx.execute(args, timeout = 1800, quiet = True, environment = environment)
    if result.return_code != 0:
        fail("triton_venv: %s failed (exit %d):\n%s\n%s" % (what, result.return_code, result.stdout, result.stderr))
    return result.stdout

def _triton_venv_impl(ctx):
    python = ctx.which(ctx.attr.python)
    if not python:
        fail("triton_venv: no '%s' on PATH" % ctx.attr.python)
    # pyenv shims are scripts: the venv is made from the real interpreter.
    real = _run(ctx, [python, "-c", "import os, sys; print(os.path.realpath(sys.executable))"], "finding the interpreter").strip()
    ctx.file("requirements.lock", ctx.attr.requirement + "\n")
    tmp = ctx.path("tmp")
    ctx.execute(["mkdir", "-p", str(tmp)])
    env = {"TMPDIR": str(tmp)}
    ctx.report_progress("installing %s" % ctx.attr.requirement.split(" ")[0])
    _run(ctx, [real, "-m", "venv", "venv"], "python -m venv", environment = env)
    venv_python = str(ctx.path("venv/bin/python3"))
    _run(ctx, [
        real,
        str(ctx.path(ctx.attr._pip_sources)),
        "install",
        "--lock",
        str(ctx.path("requirements.lock")),
        "--python",
        venv_python,
    ], "pip install " + ctx.attr.requirement, environment = env)
    ctx.delete(tmp)
    site = _run(ctx, [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                "reading the venv's site-packages").strip()
    ctx.file("site.txt", site + "\n")
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    ctx.file("BUILD", "\n".join([
        "package(default_visibility = [\"//visibility:public\"])",
        "",
        "# The venv's site-packages folder, holding only %s." % ctx.attr.requirement.split(" ")[0],
        "exports_files([\"site.txt\"])",
        "",
    ]))

triton_venv = repository_rule(
    implementation = _triton_venv_impl,
    attrs = {
        "requirement": attr.string(mandatory = True, doc = "One hash-pinned line: triton==X --hash=sha256:..."),
        "python": attr.string(default = "python3"),
        "_pip_sources": attr.label(default = Label("//tools:pip_sources.py"), allow_single_file = True),
    },
    doc = "A virtual environment holding one Triton release (site.txt: its site-packages).",
)
