"""Writes the codex_ml wheel: a reproducible zip (sorted entries, fixed timestamps and modes) with RECORD digests.

    build_wheel.py --out=codex_ml-0.1.0-cp311-abi3-linux_x86_64.whl --python_tag=cp311 --abi_tag=abi3 \
        --requires='torch>=2.13,<2.15' --extra='gpu=triton' ... codex_ml/__init__.py=python/codex_ml/__init__.py ...

Each FILE argument is ARCHIVE_NAME=PATH: the file at PATH (symlinks followed) is stored as ARCHIVE_NAME.
Arguments may come from a file, one a line, as @FILE (how tools/wheel.bzl passes them).

Read from the packaged files themselves, without importing codex_ml (it needs torch and the build machine's
Python would not do): the version from codex_ml/_version.py (which Bazel writes from tools/version.bzl) and
the console scripts from codex_ml/cli/entry_points.py. The same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import stat
import sys
import zipfile

NAME = "codex_ml"
DIST_NAME = "codex-ml"
VERSION_FILE = f"{NAME}/_version.py"
ENTRY_POINTS_FILE = f"{NAME}/cli/entry_points.py"
# Zip timestamps cannot be before 1980; any fixed value makes the bytes reproducible.
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
SUMMARY = "Training and fine-tuning code language models with fused Triton/CUDA/C++ kernels"


class WheelError(Exception):
    """Inconsistent inputs: the message says which and how to fix them."""


def digest(data: bytes) -> str:
    """The RECORD form of a file's hash: sha256=<urlsafe base64, no padding>."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def literal_assignment(source: str, name: str, filename: str):
    """The value of the top-level `name = <literal>` in Python source, without running it."""
    for node in ast.parse(source, filename).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise WheelError(f"{filename} has no top-level `{name} = ...` literal; the wheel reads it from there")


def read_files(specs: list[str]) -> dict[str, bytes]:
    """ARCHIVE_NAME=PATH arguments -> {archive name: bytes}, compiled caches dropped."""
    entries: dict[str, bytes] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.startswith(NAME + "/"):
            raise WheelError(f"bad file argument {spec!r}: expected {NAME}/<path in package>=<file>")
        if "__pycache__/" in name or name.endswith(".pyc"):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if entries.get(name, data) != data:
            raise WheelError(f"two different files would be stored as {name}: rename one of them")
        entries[name] = data
    return entries


def requires_python(python_tag: str, abi_tag: str) -> str:
    """The CPython versions the tags admit: cp311 with abi3 (the stable Python ABI) -> ">=3.11", cp311 with its
    own ABI (cp311) -> ">=3.11,<3.12"."""
    if not python_tag.startswith("cp") or not python_tag[2:].isdigit() or len(python_tag) < 4:
        raise WheelError(f"python tag {python_tag!r} is not of the form cpXY")
    if abi_tag not in ("abi3", python_tag):
        raise WheelError(f"abi tag {abi_tag!r} is neither abi3 nor the python tag {python_tag}")
    major, minor = int(python_tag[2]), int(python_tag[3:])
    return f">={major}.{minor}" if abi_tag == "abi3" else f">={major}.{minor},<{major}.{minor + 1}"


def metadata(version: str, requires: list[str], extras: list[str], python_tag: str, abi_tag: str) -> str:
    """The METADATA file (core metadata 2.1)."""
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {DIST_NAME}",
        f"Version: {version}",
        f"Summary: {SUMMARY}",
        # The compiled extensions are built for a CPython ABI (the wheel's python and abi tags say which).
        f"Requires-Python: {requires_python(python_tag, abi_tag)}",
        *[f"Requires-Dist: {req}" for req in requires],
    ]
    by_extra: dict[str, list[str]] = {}
    for spec in extras:
        extra, sep, req = spec.partition("=")
        if not sep or not extra or not req:
            raise WheelError(f"bad --extra {spec!r}: expected EXTRA=REQUIREMENT, e.g. gpu=triton")
        by_extra.setdefault(extra, []).append(req)
    for extra in sorted(by_extra):
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {req}; extra == "{extra}"' for req in by_extra[extra]]
    return "\n".join(lines) + "\n"


def build(out: str, python_tag: str, abi_tag: str, platform: str, requires: list[str], extras: list[str],
          files: list[str]) -> None:
    """Writes the wheel to `out`, whose file name must be the one the version and tags give."""
    entries = read_files(files)
    for required in (VERSION_FILE, ENTRY_POINTS_FILE):
        if required not in entries:
            raise WheelError(f"{required} is not among the packaged files; the wheel takes its metadata from it")
    version = literal_assignment(entries[VERSION_FILE].decode(), "__version__", VERSION_FILE)
    scripts = literal_assignment(entries[ENTRY_POINTS_FILE].decode(), "CONSOLE_SCRIPTS", ENTRY_POINTS_FILE)
    tag = f"{python_tag}-{abi_tag}-{platform}"
    expected = f"{NAME}-{version}-{tag}.whl"
    if not out.endswith("/" + expected) and out != expected:
        raise WheelError(f"output {out} does not match version {version} of {VERSION_FILE} and tag {tag}: "
                         f"expected a file named {expected} (is tools/version.bzl out of step?)")

    dist_info = f"{NAME}-{version}.dist-info"
    entries[f"{dist_info}/METADATA"] = metadata(version, requires, extras, python_tag, abi_tag).encode()
    entries[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: codex_ml tools/build_wheel.py\nRoot-Is-Purelib: false\n"
        f"Tag: {tag}\n").encode()
    entries[f"{dist_info}/entry_points.txt"] = (
        "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))).encode()
    record = [f"{name},{digest(data)},{len(data)}" for name, data in sorted(entries.items())]
    record.append(f"{dist_info}/RECORD,,")
    entries[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        # Sorted names, fixed time, fixed Unix modes and creator: nothing of the build machine gets in.
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | (0o755 if name.endswith(".so") else 0o644)) << 16  # pip keeps x
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, entries[name])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], fromfile_prefix_chars="@")
    parser.add_argument("--out", required=True, help="the wheel to write")
    parser.add_argument("--python_tag", required=True, help="e.g. cp311")
    parser.add_argument("--abi_tag", help="abi3 (the stable Python ABI) or, the default, the python tag")
    parser.add_argument("--platform", default="linux_x86_64")
    parser.add_argument("--requires", action="append", default=[], help="a Requires-Dist line (repeatable)")
    parser.add_argument("--extra", action="append", default=[], help="EXTRA=REQUIREMENT (repeatable)")
    parser.add_argument("files", nargs="+", help="ARCHIVE_NAME=PATH")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.python_tag, args.abi_tag or args.python_tag, args.platform, args.requires, args.extra,
              args.files)
    except (WheelError, OSError) as e:
        print(f"build_wheel: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
