"""Benchmarks that use codex_ml as its users do; not part of the codex_ml package (not in the wheel)."""
