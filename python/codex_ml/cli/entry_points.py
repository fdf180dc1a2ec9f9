"""The console scripts of codex_ml: the one table the wheel's entry_points.txt and `python -m codex_ml` read.

tools/build_wheel.py reads CONSOLE_SCRIPTS from this file's source (it does not import codex_ml), so keep it
a plain literal dict: script name -> "module:function". Each function takes no arguments, reads sys.argv and
returns an exit status (or None), as pip's generated console-script wrappers expect.
"""

CONSOLE_SCRIPTS = {
    "codex-bench": "codex_ml.cli.bench:main",
    "codex-export": "codex_ml.cli.export:main",
    "codex-generate": "codex_ml.cli.generate:main",
    "codex-runs": "codex_ml.cli.runs:main",
    "codex-sweep": "codex_ml.cli.sweep:main",
    "codex-tokenize": "codex_ml.cli.tokenizer:main",
    "codex-train": "codex_ml.cli.train:console_main",
}
