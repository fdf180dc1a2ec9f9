"""triton_aot_test: proves at build time that Triton kernels compile for sm_80 and sm_90, no GPU needed."""

def triton_aot_test(name, modules, **kwargs):
    """A test compiling every `aot_specs()` triple of each module (e.g. codex_ml.kernels.attention.triton)."""
    native.py_test(
        name = name,
        srcs = ["//tools:triton_aot_check.py"],
        main = "//tools:triton_aot_check.py",
        args = modules,
        deps = ["//python:ops"],
        python_version = "PY3",
        **kwargs
    )
