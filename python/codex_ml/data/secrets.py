"""Patterns of secrets that must never be trained on or generated: one list, used by both.

`find_secret(text)` returns the name of the first rule that matches, never the secret itself.
`redact_model_output(text)` is what every text a model wrote goes through before anyone sees it (generation, the
sample printed after training): secrets withheld, and a secret cut off by the token limit withheld too.

Two kinds of rule: token formats with a fixed prefix (found anywhere), and assignments to a secret-named key
(`DB_PASSWORD=...` lines of .env files; `password = "..."` in code), which count only when the value looks
random (Shannon entropy, mixed characters) and not like code (a dotted name, a call) or a placeholder.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator

# A secret-named key: what an assignment rule looks for left of "=" or ":".
_KEY_WORDS = (r"passwd|password|passphrase|secret|token|api_?key|apikey|access_?key|auth_?key|private_?key"
              r"|credentials?")
SECRET_KEY = re.compile(rf"(?:{_KEY_WORDS})", re.IGNORECASE)
_KEY_HINTS = ("passw", "passphrase", "secret", "token", "apikey", "api_key", "access_key", "accesskey", "auth_key",
              "authkey", "private_key", "privatekey", "credential")
# Values that name a secret rather than hold one.
_PLACEHOLDER = re.compile(r"^(?:[$%{<\[(*]|.*(?:x{4}|\*{3}|\.{3}|changeme|example|placeholder|dummy|your))",
                          re.IGNORECASE)
# Code, not a value: a dotted name, a name without digits, a call or subscript.
_CODE_VALUE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|^[A-Za-z_]+$|[()\[\]]")


def _entropy(text: str) -> float:
    """Shannon entropy of `text`'s characters, in bits per character."""
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


def _random_value(value: str) -> bool:
    """A value that reads as a generated secret: at least 8 characters of high entropy, with three of lower case,
    upper case, digits and symbols (or letters and digits in 16 or more), and neither code nor a placeholder."""
    if len(value) < 8 or _PLACEHOLDER.search(value) or _CODE_VALUE.search(value):
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]"))
    mixed = classes >= 3 or (len(value) >= 16 and re.search(r"[0-9]", value) and re.search(r"[A-Za-z]", value))
    return bool(mixed) and _entropy(value) >= min(3.0, math.log2(len(value)) - 0.5)


def _env_value(value: str) -> bool:
    """A value in a KEY=value line under a secret-named key: the name says what it is, so any value of 8 or more
    characters mixing two kinds (letters, digits, symbols, cases) counts, unless it is code or a placeholder."""
    if len(value) < 8 or _PLACEHOLDER.search(value) or _CODE_VALUE.search(value):
        return False
    return sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]")) >= 2


def _real_password(password: str) -> bool:
    """A URL's password that is not a placeholder ("pass", "$PASSWORD", "{password}", "***")."""
    return not _PLACEHOLDER.search(password) and password.lower() not in ("pass", "password", "passwd", "pwd",
                                                                           "secret", "pw", "p", "x")


# name -> (pattern, check of the group named "value" or None, hints). A rule runs only on text that holds one of
# its hints (lower case, found in the lower-cased text): a substring search is far cheaper than a regex pass.
# Token rules first: they name the format.
_RULES: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None, tuple[str, ...]]] = {
    "private_key_block": (
        re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY(?: BLOCK)?-----"
                   r"|---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----|PuTTY-User-Key-File-\d+:"),
        None, ("private key", "putty-user-key-file")),
    # Lookarounds, not \b: "_AKIA..." (an identifier's tail) has no word boundary before the A.
    "aws_access_key_id": (
        re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?![A-Za-z0-9])"),
        None, ("akia", "asia", "abia", "acca")),
    "aws_secret_access_key": (
        re.compile(r"(?i)aws_?secret_?(?:access_?)?key[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9/+]{40})"
                   r"(?![A-Za-z0-9/+=])"),
        None, ("secret",)),
    "github_token": (
        re.compile(r"(?<![A-Za-z0-9])(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}\b"),
        None, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    "gitlab_token": (re.compile(r"(?<![A-Za-z0-9])glpat-[A-Za-z0-9_\-]{20,}"), None, ("glpat-",)),
    "huggingface_token": (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{34,}(?![A-Za-z0-9])"), None, ("hf_",)),
    "npm_token": (re.compile(r"(?<![A-Za-z0-9])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])"), None, ("npm_",)),
    "pypi_token": (re.compile(r"(?<![A-Za-z0-9])pypi-AgE[A-Za-z0-9_\-]{50,}"), None, ("pypi-age",)),
    "slack_token": (re.compile(r"(?<![A-Za-z0-9])(?:xox[abeoprs]|xapp)-[A-Za-z0-9-]{10,}"), None, ("xox", "xapp-")),
    "slack_webhook": (
        re.compile(r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/]{20,}"),
        None, ("hooks.slack.com",)),
    "sendgrid_api_key": (
        re.compile(r"(?<![A-Za-z0-9])SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"), None, ("sg.",)),
    "azure_storage_key": (
        re.compile(r"(?:AccountKey|SharedAccessKey)=[A-Za-z0-9+/]{40,}={0,2}"),
        None, ("accountkey=", "sharedaccesskey=")),
    # (not \b at the end: a key may end in "-", after which \b would need a word character)
    "google_api_key": (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"), None, ("aiza",)),
    "stripe_secret_key": (re.compile(r"\b(?:sk|rk)_live_[0-9A-Za-z]{16,}\b"), None, ("_live_",)),
    "openai_api_key": (re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_\-]{32,}\b"), None, ("sk-",)),
    "jwt": (
        re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"), None, ("eyj",)),
    "url_credentials": (
        re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@\"'`]+:(?P<value>[^\s/@\"'`]+)@(?=[\w\[])"),
        _real_password, ("://",)),
    # KEY=value lines of .env files (upper-case names, as those files write them; unquoted values included).
    "env_secret": (
        re.compile(rf"(?m)^[ \t]*(?:export[ \t]+)?[A-Z0-9_]*(?:{_KEY_WORDS.upper()})[A-Z0-9_]*[ \t]*=[ \t]*"
                   r"(?P<q>[\"']?)(?P<value>[^\s\"'#]+)(?P=q)[ \t]*(?:#.*)?$"),
        _env_value, _KEY_HINTS),
    # The keyword-and-entropy rule: a quoted value assigned to a secret-named key in code or config.
    "secret_assignment": (
        re.compile(rf"(?i)(?:{_KEY_WORDS})[A-Za-z0-9_.\-]*[\"']?[ \t]*(?:=|:|:=|=>)[ \t]*"
                   r"[rb]?(?P<q>[\"'])(?P<value>[^\s\"']{8,})(?P=q)"),
        _random_value, _KEY_HINTS),
}
SECRET_RULES: dict[str, re.Pattern[str]] = {name: pattern for name, (pattern, _, _) in _RULES.items()}

# Beginnings of the token formats, for text cut off mid-secret (a generation stopped by its token limit).
_PARTIAL = re.compile(
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA|gh[pousr]_|github_pat_|glpat-|hf_|npm_|pypi-|xox[abeoprs]-|xapp-|"
    r"SG\.|AIza|[sr]k_live_|sk-|eyJ|AccountKey=|SharedAccessKey=|https://hooks\.slack\.com/)\S*$"
    r"|[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@\"'`]+:(?![0-9]*$)[^\s/@\"'`]*$")  # (host:port is no password)
_OPEN_ASSIGNMENT = re.compile(
    rf"(?i)(?:{_KEY_WORDS})[A-Za-z0-9_.\-]*[\"']?[ \t]*(?::=|=>|[:=])[ \t]*"
    r"(?:[rb]?[\"'][^\"'\n]*|[^\s\"'()\[\]]*)$")


def _matches(name: str, text: str, lowered: str) -> Iterator[re.Match[str]]:
    pattern, check, hints = _RULES[name]
    if any(hint in lowered for hint in hints):
        yield from (m for m in pattern.finditer(text) if check is None or check(m.group("value")))


def find_secret(text: str) -> str | None:
    """The name of the first secret rule matching `text`, or None."""
    lowered = text.lower()
    for name in _RULES:
        if next(_matches(name, text, lowered), None) is not None:
            return name
    return None


def redact_secrets(text: str) -> tuple[str, list[str]]:
    """`text` with every match of a secret rule replaced by "[withheld: <rule>]", and the rules that matched."""
    found: list[str] = []
    for name in _RULES:
        matches = list(_matches(name, text, text.lower()))
        for m in reversed(matches):
            text = text[:m.start()] + f"[withheld: {name}]" + text[m.end():]
        found += [name] * len(matches)
    return text, found


def partial_secret_start(text: str) -> int | None:
    """Where a secret that `text` ends in the middle of starts, or None: a token format's prefix, a URL's
    password, or a value assigned to a secret-named key that is still open (an unclosed quote, a bare word)."""
    starts = [m.start() for m in (_PARTIAL.search(text), _OPEN_ASSIGNMENT.search(text)) if m is not None]
    return min(starts) if starts else None


def redact_model_output(text: str) -> tuple[str, list[str]]:
    """A model's finished output as it may be shown: `redact_secrets`, and a last secret cut off by the end of
    generation withheld as "[withheld: truncated_secret]". Returns the text and the rules that matched."""
    text, found = redact_secrets(text)
    start = partial_secret_start(text)
    if start is not None:
        text, found = text[:start] + "[withheld: truncated_secret]", found + ["truncated_secret"]
    return text, found
