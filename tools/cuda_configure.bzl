"""Repository rules: what this machine has of CUDA, for building and for running.

cuda_configure finds nvcc (NVCC, CUDA_HOME, PATH, /usr/local/cuda) or records its absence;
`--repo_env=NVCC=none` turns CUDA off. The generated @local_cuda//:defs.bzl tells the macros in
tools/cuda.bzl whether CUDA targets can build; where they cannot, they are marked incompatible
and `bazel test //...` reports them SKIPPED instead of failing.

cuda_device_configure finds a usable CUDA device (a /dev/nvidia<N> node and `nvidia-smi -L` listing a
GPU); `--repo_env=CODEX_ML_GPU=0|1` decides instead. Its @local_gpu//:defs.bzl gives GPU_COMPATIBLE,
the target_compatible_with of tests that need a device (tools/py.bzl's gpu_pytest): without one they
are SKIPPED, never run to a green that tested nothing.
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
            "# CUDA targets cannot build here: %s." % why,
            "CUDA_AVAILABLE = False",
            "NVCC = \"\"",
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
        "# %s, CUDA runtime in %s." % (version_line[-1] if version_line else "nvcc found", lib_dir),
        "CUDA_AVAILABLE = True",
        "NVCC = \"%s\"" % nvcc,
        "CUDA_COMPATIBLE = []",
        "",
    ]))

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["NVCC", "CUDA_HOME", "PATH"],
    local = True,
)

def _find_device(ctx):
    """(True, what was found) where a CUDA device can run kernels, else (False, why not)."""
    forced = ctx.os.environ.get("CODEX_ML_GPU", "")
    if forced == "1":
        return True, "CODEX_ML_GPU=1"
    if forced == "0":
        return False, "CODEX_ML_GPU=0"
    if forced:
        fail("cuda_device_configure: CODEX_ML_GPU=%s; use 0 (no GPU tests), 1 (run them) or leave it unset (detect)" %
             forced)
    dev = ctx.path("/dev")
    nodes = []
    if dev.exists:
        nodes = [p.basename for p in dev.readdir() if p.basename.startswith("nvidia") and p.basename[6:].isdigit()]
    if not nodes:
        return False, "no /dev/nvidia<N> device node"
    smi = ctx.which("nvidia-smi")
    if not smi:
        return False, "/dev/%s exists but there is no nvidia-smi (driver) on PATH" % nodes[0]
    result = ctx.execute([smi, "-L"], timeout = 30)
    gpus = [line for line in result.stdout.splitlines() if line.startswith("GPU ")]
    if result.return_code != 0 or not gpus:
        said = (result.stderr or result.stdout).strip().replace("\n", " ")
        return False, "nvidia-smi -L lists no GPU (exit %d): %s" % (result.return_code, said)
    return True, gpus[0]

def _cuda_device_configure_impl(ctx):
    found, what = _find_device(ctx)
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    # Targets that need a device require :cuda_device where there is none; no platform has that value,
    # so they are incompatible, and Bazel names this constraint when one is asked for by name.
    ctx.file("BUILD", "\n".join([
        "package(default_visibility = [\"//visibility:public\"])",
        "",
        "constraint_setting(name = \"cuda_device_setting\")",
        "",
        "# %s" % what,
        "constraint_value(name = \"cuda_device\", constraint_setting = \":cuda_device_setting\")",
        "",
    ]))
    ctx.file("defs.bzl", "\n".join([
        "# %s" % what,
        "GPU_COMPATIBLE = %s" % ("[]" if found else "[\"@%s//:cuda_device\"]" % ctx.name),
        "",
    ]))

cuda_device_configure = repository_rule(
    implementation = _cuda_device_configure_impl,
    environ = ["CODEX_ML_GPU", "PATH"],
    local = True,
    configure = True,
)
