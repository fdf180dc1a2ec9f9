"""docs/troubleshooting.md documents every error class codex_ml defines and every exit code its commands use.

Found from the syntax tree of the package's sources (python/codex_ml and kernels/):
- an error class is a class derived, directly or through other classes of the package, from a built-in
  exception; each must have a row in the page's "Error classes" table;
- an exit code is a literal status in `sys.exit(N)`, `os._exit(N)`, `parser.exit(N, ...)`, `SystemExit(N)`
  (a message instead of a number exits with 1), or `return N` in the `main`, `run` or `console_main` function
  of a command module (one with `if __name__ == "__main__":` or a console script); each must have a row in the
  page's "Exit codes" table, and where the module is a console script the row names that script.
The messages themselves are not checked one by one: each says what went wrong and what to do where it is raised.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
from pathlib import Path

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
SOURCES = (RUNFILES / "python" / "codex_ml", RUNFILES / "kernels")
PAGE = RUNFILES / "docs" / "troubleshooting.md"
ENTRY_POINTS = RUNFILES / "python" / "codex_ml" / "cli" / "entry_points.py"

BUILTIN_EXCEPTIONS = {name for name, value in vars(builtins).items()
                      if isinstance(value, type) and issubclass(value, BaseException)}
COMMAND_FUNCTIONS = {"main", "run", "console_main"}


def _sources(roots: tuple[Path, ...]) -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path)))
            for root in roots for path in sorted(root.rglob("*.py")) if "tests" not in path.relative_to(root).parts]


def _name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def error_classes(roots: tuple[Path, ...]) -> dict[str, str]:
    """Every class derived from an exception, by name, with where it is defined (file:line)."""
    classes = {node.name: (f"{path.name}:{node.lineno}", {_name(base) for base in node.bases})
               for path, tree in _sources(roots) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    errors: dict[str, str] = {}
    grew = True
    while grew:  # a class derived from an error class of the package is one too, however deep
        grew = False
        for name, (where, bases) in classes.items():
            if name not in errors and bases & (BUILTIN_EXCEPTIONS | errors.keys()):
                errors[name] = where
                grew = True
    return errors


def _module_name(path: Path, roots: tuple[Path, ...]) -> str:
    """The dotted name codex_ml imports the file as (kernels/ is codex_ml.kernels)."""
    for root in roots:
        if path.is_relative_to(root):
            parts = path.relative_to(root).with_suffix("").parts
            return ".".join(("codex_ml", "kernels")[: 1 + (root.name == "kernels")] + parts)
    raise ValueError(path)


def _literal_codes(node: ast.expr | None, message: bool = True) -> list[int]:
    """The statuses an exit argument (or, with message=False, a returned value) can take: an int literal, either
    branch of `a if c else b`; a message string exits with 1."""
    if node is None:
        return [0] if message else []
    if isinstance(node, ast.IfExp):
        return _literal_codes(node.body, message) + _literal_codes(node.orelse, message)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return [node.value]
    if message and isinstance(node, (ast.Constant, ast.JoinedStr)):  # sys.exit("text"): Python prints it, exits 1
        return [1]
    return []  # a variable or a call: its value is one of the literals found elsewhere


def _is_command(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def exit_codes(roots: tuple[Path, ...]) -> list[tuple[int, str, str]]:
    """(code, module, file:line) for every literal exit status in the sources."""
    found = []
    for path, tree in _sources(roots):
        module = _module_name(path, roots)
        command = _is_command(tree)
        for node in ast.walk(tree):
            codes: list[int] = []
            if isinstance(node, ast.Call) and _name(node.func) in ("exit", "_exit", "SystemExit"):
                codes = _literal_codes(node.args[0] if node.args else None)
            elif command and isinstance(node, ast.FunctionDef) and node.name in COMMAND_FUNCTIONS:
                codes = [code for ret in ast.walk(node) if isinstance(ret, ast.Return)
                         for code in _literal_codes(ret.value, message=False)]
            found += [(code, module, f"{path.name}:{node.lineno}") for code in codes]
    return found


def console_scripts(entry_points: Path) -> dict[str, str]:
    """module -> console script name, from CONSOLE_SCRIPTS in codex_ml/cli/entry_points.py."""
    tree = ast.parse(entry_points.read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and _name(node.targets[0]) == "CONSOLE_SCRIPTS")
    return {target.split(":")[0]: script for script, target in table.items()}


def table_rows(page: str, heading: str) -> dict[str, str]:
    """The rows of the first table under `## heading`, by their first cell (backticks removed)."""
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    if section is None:
        return {}
    rows = {}
    for line in section.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] and set(cells[0]) != {"-"}:
            rows[cells[0].strip("`")] = line
    return rows


def undocumented_classes(roots: tuple[Path, ...], page: str) -> list[str]:
    rows = table_rows(page, "Error classes")
    return [f"{name} ({where})" for name, where in sorted(error_classes(roots).items()) if name not in rows]


def undocumented_exit_codes(roots: tuple[Path, ...], page: str, scripts: dict[str, str]) -> list[str]:
    rows = table_rows(page, "Exit codes")
    missing = []
    for code, module, where in exit_codes(roots):
        row = rows.get(str(code))
        script = scripts.get(module)
        if row is None:
            missing.append(f"exit code {code} ({where}) has no row")
        elif script is not None and script not in row:
            missing.append(f"exit code {code} of {script} ({where}): its row does not name {script}")
    return sorted(set(missing))


# The package and the real page.

def test_finds_the_error_classes_and_exit_codes():
    """The scan sees the package (a broken walk would pass the tests below with nothing to check)."""
    classes = error_classes(SOURCES)
    assert {"ConfigError", "CheckpointError", "DataError", "TokenizerError", "UsageError"} <= classes.keys()
    assert "Trainer" not in classes
    codes = {code for code, _, _ in exit_codes(SOURCES)}
    assert {0, 1, 2, 130} <= codes


def test_every_error_class_is_documented():
    missing = undocumented_classes(SOURCES, PAGE.read_text())
    assert not missing, ("docs/troubleshooting.md has no row in its 'Error classes' table for: " + ", ".join(missing)
                         + ". Add one: the class, what raises it, what it means.")


def test_every_exit_code_is_documented():
    missing = undocumented_exit_codes(SOURCES, PAGE.read_text(), console_scripts(ENTRY_POINTS))
    assert not missing, "docs/troubleshooting.md, 'Exit codes' table: " + "; ".join(missing)


def test_every_console_script_is_named_with_its_exit_codes():
    section = "".join(table_rows(PAGE.read_text(), "Exit codes").values())
    for script in console_scripts(ENTRY_POINTS).values():
        assert script in section, script


# The checks themselves, on small fixtures.

PAGE_FIXTURE = """# T

## Error classes
| class | raised by | means |
| --- | --- | --- |
| `DataError` | data | bad data |

## Exit codes
| exit code | meaning | commands |
| --- | --- | --- |
| 0 | done | every command: `codex-tool` |
| 2 | bad input | `codex-tool` |

## Other
| `SinkError` | not in the classes table |
"""


def _package(tmp_path: Path, files: dict[str, str]) -> tuple[Path, ...]:
    root = tmp_path / "codex_ml"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return (root,)


def test_a_new_error_class_needs_a_row(tmp_path):
    roots = _package(tmp_path, {
        "data.py": "class DataError(ValueError):\n    pass\n",
        "sink.py": "from codex_ml.data import DataError\n\n\nclass SinkError(DataError):\n    pass\n\n\n"
                   "class Sink:\n    pass\n",
        "deep/flow.py": "import codex_ml\n\n\nclass FlowError(codex_ml.sink.SinkError):\n    pass\n",
    })
    assert error_classes(roots).keys() == {"DataError", "SinkError", "FlowError"}
    # A name elsewhere on the page is not a row of the table.
    assert undocumented_classes(roots, PAGE_FIXTURE) == ["FlowError (flow.py:4)", "SinkError (sink.py:4)"]
    rows = "| `DataError` | data | bad data |\n| `SinkError` | sink | x |\n| `FlowError` | f | y |"
    page = PAGE_FIXTURE.replace("| `DataError` | data | bad data |", rows)
    assert undocumented_classes(roots, page) == []


def test_exit_codes_are_found_in_commands(tmp_path):
    roots = _package(tmp_path, {
        "cli/tool.py": (
            "import os, sys\n\n\ndef main():\n    if os.environ.get('A'):\n        return 2\n"
            "    if os.environ.get('B'):\n        sys.exit(5)\n    if os.environ.get('C'):\n"
            "        raise SystemExit(f'no {os}')\n    return 3 if os.environ.get('D') else 0\n\n\n"
            "def helper():\n    return 7\n\n\nif __name__ == '__main__':\n    sys.exit(main())\n"),
        "lib.py": "import os\n\n\ndef main():\n    return 9\n\n\ndef stop():\n    os._exit(130)\n",
    })
    found = {(code, module) for code, module, _ in exit_codes(roots)}
    assert found == {(2, "codex_ml.cli.tool"), (5, "codex_ml.cli.tool"), (1, "codex_ml.cli.tool"),
                     (3, "codex_ml.cli.tool"), (0, "codex_ml.cli.tool"), (130, "codex_ml.lib")}
    missing = undocumented_exit_codes(roots, PAGE_FIXTURE, {"codex_ml.cli.tool": "codex-tool"})
    assert missing == ["exit code 1 (tool.py:10) has no row", "exit code 130 (lib.py:9) has no row",
                       "exit code 3 (tool.py:4) has no row", "exit code 5 (tool.py:8) has no row"]
    # A row that does not name the command whose code it is does not document it.
    page = PAGE_FIXTURE.replace("| 2 | bad input | `codex-tool` |", "| 2 | bad input | `codex-other` |")
    assert "exit code 2 of codex-tool (tool.py:4): its row does not name codex-tool" in \
        undocumented_exit_codes(roots, page, {"codex_ml.cli.tool": "codex-tool"})


def test_kernels_are_imported_as_codex_ml_kernels(tmp_path):
    kernels = tmp_path / "kernels"
    (kernels / "bench").mkdir(parents=True)
    (kernels / "bench" / "b.py").write_text("import sys\nsys.exit('needs a GPU')\n")
    assert exit_codes((tmp_path / "codex_ml", kernels)) == [(1, "codex_ml.kernels.bench.b", "b.py:2")]
