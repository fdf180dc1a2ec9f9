"""docs/configuration-reference.md is what tools/gen_config_docs.py generates from the code today."""

import os
import sys
from pathlib import Path

RUNFILES = Path(os.environ["RUNFILES_DIR"]) / "codex_ml"
sys.path.insert(0, str(RUNFILES / "tools"))

import gen_config_docs  # noqa: E402


def test_reference_is_current():
    committed = (RUNFILES / "docs" / "configuration-reference.md").read_text()
    assert committed == gen_config_docs.render(), (
        "docs/configuration-reference.md is stale: run "
        "`tools/bazel run //tools:gen_config_docs -- $PWD/docs/configuration-reference.md`")


def test_reference_lists_every_area():
    text = gen_config_docs.render()
    for name in ("prepare_data", "GPTConfig", "Trainer", "train"):
        assert f"## `{name}`" in text
    assert "| `vocab_size` | `8000` |" in text
