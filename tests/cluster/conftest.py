"""Shared checks for the cluster assets: where they live, and a scan for secrets written in clear."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Shapes of credentials that must never be committed in a cluster file. The hex rule catches a pasted Ray
# token (`ray get-auth-token --generate` makes 64 hex characters).
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "long hex token": re.compile(r"\b[0-9a-f]{40,}\b"),
    "inline credential": re.compile(
        r"(?i)\b(RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|PASSWORD|API_KEY)"
        r"\s*[=:]\s*['\"]?[A-Za-z0-9/+_-]{8,}"
    ),
}


def find_clear_secrets(text: str) -> list[str]:
    return [
        f"{name}: {m.group(0)[:24]}..." for name, rx in SECRET_PATTERNS.items() for m in rx.finditer(text)
    ]


@pytest.fixture
def find_secrets():
    return find_clear_secrets


@pytest.fixture
def no_clear_secrets():
    def check(path: Path) -> None:
        found = find_clear_secrets(path.read_text())
        assert not found, f"{path.relative_to(ROOT)} holds what looks like a secret: {found}"

    return check
