"""The secret filter: every format it covers is found, ordinary code is not (the Python standard library, the
data pipeline's default corpus, is the measure), and a model's output cut off mid-secret is withheld."""

import pytest

from codex_ml.data.corpus import _expand, default_sources
from codex_ml.data.secrets import SECRET_RULES, find_secret, redact_model_output, redact_secrets

# Secrets assembled at run time so that this file itself holds none.
MIXED = "a1B2c3D4e5"
TRUE_POSITIVES = [
    ("aws_access_key_id", "key = '" + "AKIA" + "IOSFODNN7EXAMPL1'"),
    ("aws_access_key_id", "MY_KEY_" + "AKIA" + "IOSFODNN7EXAMPL1 = 1"),  # "_AKIA": no \b before the A
    ("aws_secret_access_key", "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYzEXAMPLEKE"),
    ("aws_secret_access_key", 'AWS_SECRET_KEY="' + MIXED * 4 + '"'),
    ("env_secret", "DB_PASSWORD=" + "s3cr3tP4ss!"),
    ("env_secret", "export API_TOKEN=" + "9f8e7d6c5b4a39281706"),
    ("env_secret", "STRIPE_SECRET = '" + "Zq8kLm2Xp7" + "'  # live"),
    ("url_credentials", "postgres://admin:" + "Hx7$kq2Lm@db.example.com:5432/app"),
    ("url_credentials", "https://bob:" + "t0ps3cret@host/x"),
    ("huggingface_token", "HF = 'hf_" + "aBcDeFgHiJ" * 3 + "abcd'"),
    ("gitlab_token", "glpat-" + "xY9zAb3CdE5fGh7IjK1l"),
    ("npm_token", "//registry.npmjs.org/:_authToken=npm_" + MIXED * 3 + "a1B2c3"),
    ("pypi_token", "password = pypi-" + "AgEIcHlwaS5vcmcCJ" + MIXED * 5),
    ("slack_token", "xapp-1-A0123456789-" + "1234567890123-abcdef"),
    ("slack_token", "xoxb-" + "1234567890-abcdef"),
    ("slack_webhook", "https://hooks.slack.com/services/" + "T00000000/B00000000/" + "X" * 24),
    ("sendgrid_api_key", "SG." + "a1B2c3D4e5F6g7H8i9J0kL" + "." + MIXED * 4 + "a1B"),
    ("azure_storage_key", "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=" + "a1B2c3D4e5+/" * 7 + "ab==;"),
    ("private_key_block", "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n"),
    ("private_key_block", "---- BEGIN SSH2 ENCRYPTED " + "PRIVATE KEY ----\nAAAA"),
    ("private_key_block", "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3Bl"),
    ("secret_assignment", 'client_secret: "' + "Zx9-Qw8_Er7tYu6" + '"'),
    ("secret_assignment", 'self.api_key = "' + "9f8e7d6c5b4a39281706abcd" + '"'),
    ("github_token", "token = 'ghp_" + MIXED * 4 + "'"),
    ("google_api_key", "k = 'AIza" + "B" * 34 + "-'"),
    ("stripe_secret_key", "stripe.api_key = sk_live_" + MIXED * 2),
    ("openai_api_key", "client = OpenAI(api_key='sk-proj-" + MIXED * 4 + "')"),
    ("jwt", "auth = 'eyJ" + "hbGciOiJIUzI1" + ".eyJ" + "zdWIiOiIxMjM0" + "." + "SflKxwRJSMeKKF2QT4fw'"),
]
ORDINARY_CODE = [
    "token = tokenizer.next()",
    "password = getpass.getpass()",
    'PASSWORD = os.environ["PASSWORD"]',
    "TOKEN_TYPE = tokenize.NAME",
    "ERRORTOKEN = 59",
    "url = 'http://localhost:8080/x'",
    'secret = "changeme"',
    'url = "https://user:password@host"',
    'api_key = "YOUR_API_KEY_HERE"',
    'password = "${DB_PASSWORD}"',
    "x = 'AKIA is a prefix'",
    "token_type = 'quoted-string'",
    "SECRET_KEY = settings.SECRET_KEY",
]
# Files of the standard library that the rules flag. The one expected: a test that puts credentials in a URL.
STDLIB_FLAGGED_AT_MOST = 2


@pytest.mark.parametrize("rule,text", TRUE_POSITIVES)
def test_every_covered_format_is_found(rule, text):
    assert find_secret(text) == rule
    redacted, found = redact_secrets(f"before\n{text}\nafter")
    assert found == [rule] and f"[withheld: {rule}]" in redacted and redacted.startswith("before\n")


@pytest.mark.parametrize("text", ORDINARY_CODE)
def test_ordinary_code_is_not_flagged(text):
    assert find_secret(text) is None


def test_every_rule_has_a_true_positive():
    assert {rule for rule, _ in TRUE_POSITIVES} == set(SECRET_RULES)


def test_the_standard_library_is_almost_never_flagged():
    files, _ = _expand(default_sources()[0])
    assert len(files) > 500
    flagged = []
    for path in files:
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rule = find_secret(text)
        if rule is not None:
            flagged.append((rule, str(path)))
    print(f"{len(flagged)} of {len(files)} standard library files flagged: {flagged}")
    assert len(flagged) <= STDLIB_FLAGGED_AT_MOST, flagged


@pytest.mark.parametrize("text,kept", [
    ("the key is ghp_" + "a1B2", "the key is "),
    ("db = 'postgres://admin:" + "Hx7k", "db = '"),
    ('password = "' + "Hx7k", ""),
    ("HF_TOKEN=hf_" + "aBcD", "HF_"),
])
def test_a_secret_cut_off_at_the_end_is_withheld(text, kept):
    out, found = redact_model_output(text)
    assert out == kept + "[withheld: truncated_secret]" and found == ["truncated_secret"]


@pytest.mark.parametrize("text", ["done = True\n", "see http://localhost:8000", "token = get()", 'password = "x"'])
def test_ordinary_output_ending_anywhere_is_kept(text):
    assert redact_model_output(text) == (text, [])
