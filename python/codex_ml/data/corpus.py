"""Reading a corpus: sources, the non-UTF-8 policy, exact deduplication, the secret filter, splits.

Every decision depends on a document's content only (never on file order or worker count), so the
same sources give the same documents and splits on every machine.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from codex_ml.data.secrets import find_secret

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad data input; the message names the file and the problem."""


@dataclass(frozen=True)
class Document:
    text: str
    sha256: str
    source: str  # file path (or path#line for JSON Lines): where it came from, for messages

    @property
    def split_key(self) -> float:
        """A number in [0, 1) from the content hash: assigns the document to a split.

        Taken from the hash's last digits: documents are ordered (and cut by max_documents) by its first
        digits, and the two must be independent.
        """
        return int(self.sha256[-12:], 16) / float(1 << 48)


def check_splits(fractions: Sequence[float]) -> None:
    """Raises DataError unless `fractions` are three non-negative numbers summing to 1 (NaN fails too)."""
    if len(fractions) != 3 or not all(f >= 0 for f in fractions) or not abs(sum(fractions) - 1.0) <= 1e-6:
        raise DataError(f"splits must be three non-negative fractions summing to 1, got {fractions}")


@dataclass
class Corpus:
    documents: list[Document]  # in content-hash order
    stats: Counter = field(default_factory=Counter)
    secret_rules: Counter = field(default_factory=Counter)
    sources: list[dict] = field(default_factory=list)

    def split(self, fractions: tuple[float, float, float]) -> dict[str, list[Document]]:
        """Assigns each document to train/val/test by its content hash."""
        check_splits(fractions)
        bounds = (fractions[0], fractions[0] + fractions[1])
        out: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for doc in self.documents:
            key = doc.split_key
            out["train" if key < bounds[0] else "val" if key < bounds[1] else "test"].append(doc)
        return out


def stdlib_root() -> Path:
    """The running interpreter's standard library directory (its own source, no site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_sources() -> list[str]:
    return [str(stdlib_root() / "**" / "*.py")]


def _hidden_or_packaged(files: list[Path], root: Path) -> list[Path]:
    """The files below `root` that lie in a hidden directory, site-packages/dist-packages or a virtual environment
    (a directory holding pyvenv.cfg)."""
    venvs = {p.parent for p in root.rglob("pyvenv.cfg")}
    return [f for f in files
            if any(p.startswith(".") or p in ("site-packages", "dist-packages") for p in f.relative_to(root).parts[:-1])
            or any(parent in venvs for parent in f.parents)]


def _expand(spec: str, include_hidden: bool = False) -> tuple[list[Path], str | None]:
    """Files of one source spec: a file, a directory (all *.py below it), a glob; `file.jsonl[#field]`.

    Directories and globs skip hidden directories, site-packages and virtual environments unless include_hidden.
    """
    field_name = None
    if "#" in spec and spec.split("#", 1)[0].endswith((".jsonl", ".json")):
        spec, field_name = spec.split("#", 1)
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        base = Path(spec.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0])
        if not base.exists() and not base.parent.exists():
            raise DataError(f"source {spec!r}: the directory {base} does not exist")
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True, include_hidden=include_hidden)
                       if Path(p).is_file())
        if not include_hidden:
            files = [f for f in files if "site-packages" not in f.parts and "dist-packages" not in f.parts]
        if not files:
            raise DataError(f"source {spec!r}: no files match this pattern")
        return files, field_name
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.py") if p.is_file())
        if not include_hidden:
            skipped = set(_hidden_or_packaged(files, path))
            files = [f for f in files if f not in skipped]
        if not files:
            raise DataError(f"source {spec!r}: the directory has no *.py files outside hidden directories and "
                            f"virtual environments (give a glob such as '{spec}/**/*.txt', or include_hidden=True)")
        return files, field_name
    if path.is_file():
        return [path], field_name
    raise DataError(f"source {spec!r} does not exist: give a file, a directory or a glob")


def _is_jsonl(path: Path) -> bool:
    return path.suffix in (".jsonl", ".json")


def _jsonl_texts(path: Path, raw: bytes, field_name: str, policy: str, stats: Counter) -> list[tuple[str, str]]:
    """(text, "path:line") of each record's `field_name`. Lines end at "\n" only: JSON strings may hold
    U+2028 and the like raw, which str.splitlines() would split. The non-UTF-8 policy applies per line."""
    texts = []
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    for lineno, line_bytes in enumerate(raw.split(b"\n"), 1):
        line = _decode(line_bytes, policy, f"{path}:{lineno}")
        if line is None:
            stats["skipped_non_utf8"] += 1
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
            raise DataError(f"{path}:{lineno}: no string field {field_name!r} (use {path}#FIELD)")
        text = record[field_name]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud800"): not UTF-8 text, so the policy applies
            text = _decode(text.encode("utf-8", "surrogatepass"), policy, f"{path}:{lineno}")
            if text is None:
                stats["skipped_non_utf8"] += 1
                continue
        texts.append((text, f"{path}:{lineno}"))
    return texts


def _decode(raw: bytes, policy: str, where: str) -> str | None:
    """raw as UTF-8 under the non-UTF-8 policy: None to skip, U+FFFD for "replace", a DataError naming `where`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if policy == "skip":
            return None
        if policy == "replace":
            return raw.decode("utf-8", errors="replace")
        raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                        "use non_utf8='skip' or 'replace'") from err


def read_corpus(
    sources: Sequence[str] | None = None,
    *,
    non_utf8: str = "skip",
    filter_secrets: bool = True,
    max_documents: int | None = None,
    min_chars: int = 1,
    include_hidden: bool = False,
) -> Corpus:
    """Reads, decodes, deduplicates and filters documents from `sources` (default: the stdlib).

    non_utf8: "skip" (count and drop, the default), "replace" (U+FFFD), or "error".
    max_documents: keep the first N documents in content-hash order (independent of file order).
    include_hidden: directory and glob sources also read hidden directories (.git, .venv, ...), site-packages and
      virtual environments, which they skip by default.
    """
    if non_utf8 not in ("skip", "replace", "error"):
        raise DataError(f"non_utf8 must be 'skip', 'replace' or 'error', got {non_utf8!r}")
    if isinstance(sources, (str, Path)):
        raise DataError(f"sources must be a list of files, directories or globs, got the single {sources!r}: "
                        f"pass [{str(sources)!r}]")
    if sources is not None and not list(sources):
        raise DataError("sources is an empty list: give at least one file, directory or glob "
                        "(or leave it unset for the Python standard library)")
    specs = list(sources) if sources is not None else default_sources()
    stats: Counter = Counter()
    secret_rules: Counter = Counter()
    by_hash: dict[str, Document] = {}
    source_info = []
    for spec in specs:
        files, field_name = _expand(spec, include_hidden)
        digest = hashlib.sha256()
        for path in files:
            raw = path.read_bytes()
            digest.update(hashlib.sha256(raw).digest())
            stats["files"] += 1
            # JSON Lines files (however they were named: a file, or a glob's match) read field "text" by default.
            file_field = field_name or ("text" if _is_jsonl(path) else None)
            if file_field is not None:
                texts = _jsonl_texts(path, raw, file_field, non_utf8, stats)
            else:
                text = _decode(raw, non_utf8, str(path))
                if text is None:
                    stats["skipped_non_utf8"] += 1
                    continue
                texts = [(text, str(path))]
            for text, where in texts:
                if len(text.strip()) < min_chars:
                    stats["skipped_empty"] += 1
                    continue
                if "\x00" in text:
                    stats["skipped_binary"] += 1
                    continue
                sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
                if sha in by_hash:
                    stats["duplicates_removed"] += 1
                    continue
                by_hash[sha] = Document(text, sha, where)
        source_info.append({"spec": spec, "files": len(files), "sha256": digest.hexdigest()})
    # In content-hash order, so that which documents are kept never depends on file order; secrets are
    # looked for only until max_documents are kept (the scan is the slow part).
    documents = []
    for sha in sorted(by_hash):
        if max_documents is not None and len(documents) >= max_documents:
            break
        rule = find_secret(by_hash[sha].text) if filter_secrets else None
        if rule is not None:
            stats["skipped_secrets"] += 1
            secret_rules[rule] += 1
        else:
            documents.append(by_hash[sha])
    if not documents:
        raise DataError(f"the corpus is empty: sources {specs} gave no usable document "
                        f"({dict(stats)}); check the paths and the non_utf8 policy")
    stats["documents"] = len(documents)
    return Corpus(documents, stats, secret_rules, source_info)
