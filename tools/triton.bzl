"""triton_aot_test: proves at build time that Triton kernels compile for sm_80 and sm_90, no GPU needed."""

def triton_aot_test(name, modules, triton = None, **kwargs):
    """A test compiling every `aot_specs()` spec of each module (e.g. codex_ml.kernels.attention.triton).

    triton: a triton_venv repository (tools/triton_venv.bzl), e.g. "@triton36": compile with the Triton release it
    holds instead of the locked one (the test checks that this release is the one imported).
    """
    args = []
    data = []
    if triton:
        args = ["--triton_site=$(rootpath %s//:site.txt)" % triton]
        data = ["%s//:site.txt" % triton]
    native.py_test(
        name = name,
        srcs = ["//tools:triton_aot_check.py"],
        main = "//tools:triton_aot_check.py",
        args = args + modules,
        data = data,
        deps = ["//python:ops"],
        python_version = "PY3",
        **kwargs
    )
