"""Patterns of secrets that must never be trained on or generated: one list, used by both.

`find_secret(text)` returns the name of the first rule that matches, never the secret itself.
"""

from __future__ import annotations

import re

SECRET_RULES: dict[str, re.Pattern[str]] = {
    "private_key_block": re.compile(
        r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY(?: BLOCK)?-----"),
    "aws_access_key_id": re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
    "github_token": re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}\b"),
    "slack_token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    # (not \b at the end: a key may end in "-", after which \b would need a word character)
    "google_api_key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"),
    "stripe_secret_key": re.compile(r"\b(?:sk|rk)_live_[0-9A-Za-z]{16,}\b"),
    "openai_api_key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_\-]{32,}\b"),
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"),
}


def find_secret(text: str) -> str | None:
    """The name of the first secret rule matching `text`, or None."""
    for name, pattern in SECRET_RULES.items():
        if pattern.search(text):
            return name
    return None


def redact_secrets(text: str) -> tuple[str, list[str]]:
    """`text` with every match of a secret rule replaced by "[withheld: <rule>]", and the rules that matched."""
    found: list[str] = []
    for name, pattern in SECRET_RULES.items():
        text, count = pattern.subn(f"[withheld: {name}]", text)
        found += [name] * count
    return text, found
