"""Writes the codex_ml wheel: a reproducible zip (sorted entries, fixed timestamps) with RECORD digests.

Usage: build_wheel.py --out=WHEEL --version=V --python_tag=cp311 --torch=2.13.0 --requires=REQ... FILE...
Each FILE is a path ending in .../codex_ml/<relative path> (sources or Bazel outputs); it is stored
at codex_ml/<relative path>, symlinks followed.
"""

import argparse
import base64
import hashlib
import sys
import zipfile

NAME = "codex_ml"
ENTRY_POINTS = {
    "codex-train": "codex_ml.cli.train:console_main",
    "codex-tokenize": "codex_ml.cli.tokenizer:main",
}
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _archive_name(path: str) -> str:
    marker = "/codex_ml/"
    index = ("/" + path).rfind(marker)
    if index < 0:
        raise SystemExit(f"build_wheel: {path} is not inside a codex_ml/ directory")
    return "codex_ml/" + ("/" + path)[index + len(marker):]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--python_tag", required=True)
    parser.add_argument("--platform", default="linux_x86_64")
    parser.add_argument("--requires", action="append", default=[])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    dist_info = f"{NAME}-{args.version}.dist-info"
    tag = f"{args.python_tag}-{args.python_tag}-{args.platform}"
    entries: dict[str, bytes] = {}
    for path in args.files:
        if path.endswith((".pyc", ".bzl")) or "__pycache__" in path:
            continue
        with open(path, "rb") as f:
            entries[_archive_name(path)] = f.read()
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {NAME.replace('_', '-')}",
        f"Version: {args.version}",
        "Summary: Training and fine-tuning code language models with fused Triton/CUDA/C++ kernels",
        "Requires-Python: >=3.11",
        *[f"Requires-Dist: {req}" for req in args.requires],
    ]
    entries[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    entries[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: codex_ml tools/build_wheel.py\nRoot-Is-Purelib: false\n"
        f"Tag: {tag}\n").encode()
    entries[f"{dist_info}/entry_points.txt"] = (
        "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(ENTRY_POINTS.items()))).encode()
    record = [f"{name},{_digest(data)},{len(data)}" for name, data in sorted(entries.items())]
    record.append(f"{dist_info}/RECORD,,")
    entries[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            executable = name.endswith(".so")
            info.external_attr = (0o755 if executable else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, entries[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
