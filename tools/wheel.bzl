"""codex_wheel: the wheel of a py_library, built from exactly the files the library ships (no list by hand)."""

def _codex_wheel_impl(ctx):
    root = ctx.attr.package_root + "/"

    # Sources, generated files and data (the assembled kernels) all travel in the library's runfiles.
    files = [
        f
        for f in ctx.attr.library[DefaultInfo].default_runfiles.files.to_list()
        if f.short_path.startswith(root)
    ]
    if not files:
        fail("%s has no files under %s" % (ctx.attr.library.label, root))

    abi_tag = ctx.attr.abi_tag or ctx.attr.python_tag
    tag = "%s-%s-%s" % (ctx.attr.python_tag, abi_tag, ctx.attr.platform)
    out = ctx.actions.declare_file("codex_ml-%s-%s.whl" % (ctx.attr.version, tag))
    args = ctx.actions.args()
    args.use_param_file("@%s", use_always = True)
    args.set_param_file_format("multiline")
    args.add("--out=" + out.path)
    args.add("--python_tag=" + ctx.attr.python_tag)
    args.add("--abi_tag=" + abi_tag)
    args.add("--platform=" + ctx.attr.platform)
    args.add_all(ctx.attr.requires, format_each = "--requires=%s")
    for extra, reqs in sorted(ctx.attr.extras.items()):
        args.add_all(reqs, format_each = "--extra=" + extra + "=%s")
    args.add_all(sorted(["%s=%s" % (f.short_path[len(root):], f.path) for f in files]))
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = files,
        outputs = [out],
        mnemonic = "CodexWheel",
        progress_message = "Writing wheel %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

codex_wheel = rule(
    implementation = _codex_wheel_impl,
    attrs = {
        "library": attr.label(mandatory = True, doc = "The py_library whose files make the wheel."),
        "package_root": attr.string(mandatory = True, doc = "Workspace directory the import root is in, e.g. python."),
        "version": attr.string(mandatory = True, doc = "For the file name; the tool checks it against _version.py."),
        "python_tag": attr.string(mandatory = True, doc = "e.g. cp311: the oldest CPython the wheel runs on."),
        "abi_tag": attr.string(doc = "abi3 (extensions on the stable Python ABI: CPython >= python_tag) or, by " +
                                     "default, python_tag (that one CPython minor version)."),
        "platform": attr.string(default = "linux_x86_64"),
        "requires": attr.string_list(doc = "Requires-Dist lines."),
        "extras": attr.string_list_dict(doc = "Optional dependency groups: extra name -> requirements."),
        "_tool": attr.label(default = "//tools:build_wheel", executable = True, cfg = "exec"),
    },
    doc = "A reproducible platform wheel of `library` (tools/build_wheel.py), console scripts included.",
)
