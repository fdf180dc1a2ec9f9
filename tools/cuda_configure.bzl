"""Repository rule: finds nvcc (NVCC, CUDA_HOME, PATH, /usr/local/cuda) or records its absence.

`--repo_env=NVCC=none` turns CUDA off. The generated @local_cuda//:defs.bzl tells the macros in
tools/cuda.bzl whether CUDA targets can build; where they cannot, they are marked incompatible
and `bazel test //...` reports them SKIPPED instead of failing.
"""

def _find_nvcc(ctx):
    env_nvcc = ctx.os.environ.get("NVCC", "")
    if env_nvcc == "none":
        return None, "disabled by NVCC=none"
    candidates = []
    if env_nvcc:
        candidates.append(env_nvcc)
    if ctx.os.environ.get("CUDA_HOME"):
        candidates.append(ctx.os.environ["CUDA_HOME"] + "/bin/nvcc")
    on_path = ctx.which("nvcc")
    if on_path:
        candidates.append(str(on_path))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if ctx.path(candidate).exists:
            return ctx.path(candidate), "found"
    return None, "no nvcc in NVCC, CUDA_HOME, PATH or /usr/local/cuda"

def _cuda_configure_impl(ctx):
    nvcc, why = _find_nvcc(ctx)
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    if nvcc == None:
        # The target must exist for analysis even though every CUDA target is incompatible here.
        ctx.file("BUILD", "\n".join([
            "package(default_visibility = [\"//visibility:public\"])",
            "cc_library(name = \"cudart_static\")",
            "",
        ]))
        ctx.file("defs.bzl", "\n".join([
            "CUDA_AVAILABLE = False",
            "CUDA_WHY = \"%s\"" % why,
            "NVCC = \"\"",
            "CUDA_LIB_DIR = \"\"",
            "CUDA_COMPATIBLE = [\"@platforms//:incompatible\"]",
            "",
        ]))
        return

    # nvcc may be a wrapper script (/usr/local/bin/nvcc): ask it where the toolkit lives.
    result = ctx.execute([nvcc, "--version"])
    if result.return_code != 0:
        fail("cuda_configure: %s --version failed: %s" % (nvcc, result.stderr))
    version_line = [l for l in result.stdout.splitlines() if l.startswith("Build") or "release" in l]
    dryrun = ctx.execute([nvcc, "--dryrun", "-x", "cu", "/dev/null", "-c", "-o", "/dev/null"])
    cuda_home = ""
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if "TOP=" in line:
            cuda_home = line.split("TOP=", 1)[1].strip()
            break
    if not cuda_home:
        cuda_home = str(nvcc.dirname.dirname)
    lib_dir = ""
    for candidate in [cuda_home + "/lib64", cuda_home + "/targets/x86_64-linux/lib", cuda_home + "/lib"]:
        if ctx.path(candidate + "/libcudart_static.a").exists:
            lib_dir = ctx.path(candidate).realpath
            break
    if not lib_dir:
        fail("cuda_configure: found %s but no libcudart_static.a under %s; set CUDA_HOME, or --repo_env=NVCC=none" % (nvcc, cuda_home))
    ctx.symlink(str(lib_dir) + "/libcudart_static.a", "libcudart_static.a")
    ctx.file("BUILD", "\n".join([
        "package(default_visibility = [\"//visibility:public\"])",
        "cc_import(name = \"cudart_static\", static_library = \"libcudart_static.a\")",
        "",
    ]))
    ctx.file("defs.bzl", "\n".join([
        "CUDA_AVAILABLE = True",
        "CUDA_WHY = \"%s\"" % (version_line[-1] if version_line else "found"),
        "NVCC = \"%s\"" % nvcc,
        "CUDA_LIB_DIR = \"%s\"" % lib_dir,
        "CUDA_COMPATIBLE = []",
        "",
    ]))

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["NVCC", "CUDA_HOME", "PATH"],
    local = True,
)
