"""docs/troubleshooting.md names every error a user can meet from codex_ml's Python code.

Found from the syntax tree of the codex_ml package (python/codex_ml, with the kernels' Python that Bazel
places in codex_ml/kernels): each `raise E(message)`, `parser.error(message)`, `warnings.warn(message)`,
`log.warning(message)`, and each string an `_explain_*` function returns. How the message starts (its first
words, a placeholder for each f-string field or %s) must appear in the page, so that a user who searches the
page for the words of their error finds it. Messages with no words of their own (a re-raise of another
error's text, or a prefix such as "Trainer: " before one) are checked where that text is written.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
PACKAGE = RUNFILES / "python" / "codex_ml"
PAGE = RUNFILES / "docs" / "troubleshooting.md"

# A message must start with this many words of its own (not counting filled-in values); fewer is a prefix
# such as "Trainer: " before another error's text.
MIN_WORDS = 2
# A message is recognised by how it starts: the page need not repeat all of a long one.
START_WORDS = 8
FIELD = "\x00"  # where the message fills in a value; the page writes a placeholder (P, N, X, ...) there


def _normalize(text: str) -> str:
    """Case, backticks and runs of whitespace do not matter to a reader searching the page."""
    return re.sub(r"\s+", " ", text.replace("`", "")).strip().lower()


def _template(node: ast.expr) -> str | None:
    """A message expression's text with FIELD where a value is filled in; None if it is not a string
    expression (a variable, a call): that message is written, and checked, where it is made."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.sub(r"%[-+ #0-9.,]*[sdrfg]", FIELD, node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else FIELD for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        if left is None and right is None:
            return None
        return (left or FIELD) + (right or FIELD)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):  # "..." % (args)
        return _template(node.left)
    return None


def _start(template: str) -> str:
    """How the message starts: its first START_WORDS words, without filled-in values or punctuation at either
    end; "" if it has fewer than MIN_WORDS words of its own."""
    tokens, words = [], 0
    for token in re.sub(FIELD + "+", FIELD, template).split():  # adjacent fields read as one
        tokens.append(token)
        words += bool(re.search(r"[A-Za-z0-9]", token.replace(FIELD, "")))
        if words == START_WORDS:
            break
    start = " ".join(tokens).strip(FIELD + " :;,.'\"(=")
    return start if words >= MIN_WORDS else ""


def _pattern(start: str) -> re.Pattern:
    """Matches the start in the normalized page, where each FIELD is a placeholder of up to 60 characters."""
    literal = [r"\s+".join(map(re.escape, part.split(" "))) for part in _normalize(start).split(FIELD)]
    return re.compile(r"[^|]{1,60}?".join(literal))


def _message_arg(call: ast.Call) -> ast.expr | None:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in ("error", "warn", "warning") and call.args:
        return call.args[0]
    return None


def messages() -> list[tuple[str, int, str]]:
    """(file relative to the package, line, how it starts) for every user-facing message in python/codex_ml."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        nodes = list(ast.walk(ast.parse(path.read_text(), str(path))))
        raised = {id(node.exc) for node in nodes if isinstance(node, ast.Raise)}
        # A function named _explain_* returns the text of an error raised elsewhere (the CLI's gin errors).
        explained = {id(n) for f in nodes if isinstance(f, ast.FunctionDef) and f.name.startswith("_explain")
                     for n in ast.walk(f) if isinstance(n, ast.Return)}
        for node in nodes:
            arg = None
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                arg = node.exc.args[0]
            elif id(node) in explained:
                arg = node.value
            elif isinstance(node, ast.Call) and id(node) not in raised:  # `raise error(...)` counts once
                arg = _message_arg(node)
            template = _template(arg) if arg is not None else None
            start = _start(template) if template is not None else ""
            if start:
                found.append((rel, node.lineno, start))
    return found


def _shown(start: str) -> str:
    return start.replace(FIELD, "X")


def test_finds_the_messages():
    """The scan sees the package's errors (a broken walk would pass the test below with nothing to check)."""
    found = messages()
    assert len(found) > 150
    starts = {_shown(start) for _, _, start in found}
    assert "the loss got no tokens (N = 0): pass" in starts
    # f-string fields, and log.warning's %s, are placeholders; a leading field is dropped.
    assert "Checkpoint X has no X: it is partial (interrupted while" in starts
    assert "Removing partial checkpoint X left by an interrupted run" in starts
    assert "source X does not exist: give a file, a" in starts
    assert "Unknown configurable X.X Run with --gin_help to list every" in starts  # from _explain_gin_error


def test_start_of_a_message():
    def start(source: str) -> str:
        return _shown(_start(_template(ast.parse(source).body[0].value)))

    assert start('f"Checkpoint {p}: {name} is corrupt ({why}). " + f"Delete {p}."') == \
        "Checkpoint X: X is corrupt (X). Delete"
    assert start('"%s: no such file, %d tried" % (a, b)') == "no such file, X tried"
    assert start('"one two three four five six seven eight nine ten"') == "one two three four five six seven eight"
    assert start('f"Trainer: {e}"') == ""
    assert start('f"no file {a}{b} here"') == "no file X here"
    assert _template(ast.parse("message").body[0].value) is None  # a variable: checked where it is written


def test_pattern_matches_placeholders_and_nothing_else():
    pattern = _pattern(_start(_template(ast.parse('f"Checkpoint {p}: {name} is corrupt ({why})."').body[0].value)))
    assert pattern.search(_normalize("| `Checkpoint P: F is corrupt (SHA-256 differs)` | delete it |"))
    assert not pattern.search(_normalize("| `Checkpoint P: F is missing` | is corrupt (it) |"))
    assert not pattern.search(_normalize("Checkpoint P | F is corrupt (X)"))


@pytest.mark.parametrize("rel, line, start", messages(), ids=lambda v: _shown(str(v))[:60])
def test_message_is_in_the_troubleshooting_page(rel, line, start):
    page = _normalize(PAGE.read_text())
    assert _pattern(start).search(page), (
        f"python/codex_ml/{rel}:{line}: a message that starts {_shown(start)!r} is not in docs/troubleshooting.md: "
        "add it (its words as printed, a placeholder such as P or N for each filled-in value) and what to do")
