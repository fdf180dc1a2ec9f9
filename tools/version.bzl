"""The version of codex_ml: the one place it is written (codex_ml/_version.py and the wheel take it from here)."""

VERSION = "0.1.0"
