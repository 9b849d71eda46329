"""The tree passes ruff's error rules (pyproject.toml [tool.ruff.lint]: undefined/unused names, syntax)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
import pytest

# Integration tier: runs ruff as a subprocess.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_no_errors():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
