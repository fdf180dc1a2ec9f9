"""Assembling the one importable package, codex_ml, from python/ and kernels/."""

def _package_files_impl(ctx):
    outputs = []
    for src in ctx.files.srcs:
        path = src.short_path
        if not path.startswith(ctx.attr.strip_prefix):
            fail("%s is not under %s" % (path, ctx.attr.strip_prefix))
        rel = path[len(ctx.attr.strip_prefix):].lstrip("/")
        out = ctx.actions.declare_file(ctx.attr.prefix + "/" + rel)
        ctx.actions.symlink(output = out, target_file = src)
        outputs.append(out)
    return [DefaultInfo(files = depset(outputs), runfiles = ctx.runfiles(files = outputs))]

package_files = rule(
    implementation = _package_files_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = True, mandatory = True),
        "prefix": attr.string(mandatory = True, doc = "Directory, relative to this package, to place the files in."),
        "strip_prefix": attr.string(default = "", doc = "Workspace-relative prefix removed from each source path."),
    },
    doc = "Places files (sources or build outputs) under `prefix` in this package's output tree, keeping their relative paths.",
)
