"""ruff_test: lints Python sources with the locked ruff; fails on any file under its roots it was not given.
ruff_tests: one ruff_test per area of python/codex_ml and one for the rest of the tree, as one test_suite."""

load("//tools:py.bzl", "CODEX_AREAS")

def ruff_test(name, srcs, roots, skip = [], **kwargs):
    """ruff over `srcs`, which must hold every .py file under the `roots` folders except those under `skip`."""
    native.py_test(
        name = name,
        srcs = ["//tools:lint.py"],
        main = "//tools:lint.py",
        args = ["--root=" + r for r in roots] + ["--skip=" + s for s in skip] +
               ["$(locations %s)" % s for s in srcs],
        data = srcs + ["//:ruff.toml"],
        python_version = "PY3",
        **kwargs
    )

def ruff_tests(name, srcs, roots):
    """`<name>_<area>` for each area of python/codex_ml (//python:<area>_py_sources), `<name>_tree` for `srcs`
    (the rest: every file under `roots` outside the areas), and the test_suite `name` running them all.

    An edit reruns only the lint target of its own folder.
    """
    areas = ["python/codex_ml/" + area for area in CODEX_AREAS]
    for area in CODEX_AREAS:
        ruff_test(
            name = "%s_%s" % (name, area),
            srcs = ["//python:%s_py_sources" % area],
            roots = ["python/codex_ml/" + area],
            size = "small",
        )
    ruff_test(name = name + "_tree", srcs = srcs, roots = roots, skip = areas, size = "small")
    native.test_suite(
        name = name,
        tests = [":%s_%s" % (name, area) for area in CODEX_AREAS] + [":%s_tree" % name],
    )
