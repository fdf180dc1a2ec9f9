"""Hugging Face Hub access: off unless a setting asks for it.

transformers, peft and huggingface_hub read HF_HUB_OFFLINE when they are imported, so `hub_offline()` runs
before codex_ml imports any of them; every load also passes local_files_only, which holds even where they were
imported earlier by someone else.
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline(allow_hub: bool = False) -> None:
    """Sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 for this process unless `allow_hub` (then leaves them as
    the user set them)."""
    if not allow_hub:
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"
