"""ruff_test: lints Python sources with the locked ruff; fails on any file of the tree it was not given."""

def ruff_test(name, srcs, **kwargs):
    native.py_test(
        name = name,
        srcs = ["//tools:lint.py"],
        main = "//tools:lint.py",
        args = ["$(locations %s)" % s for s in srcs],
        data = srcs + ["//:ruff.toml"],
        python_version = "PY3",
        **kwargs
    )
