"""The lint step of the test command: ``ruff check`` (ruff.toml: style, imports, bugbear, and McCabe
complexity at most 15 in the library) is clean and the tree is as ``ruff format`` writes it: one style."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_is_clean():
    res = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_format_is_clean():
    """One style: the tree is as ``ruff format`` writes it (run ``ruff format .`` before committing)."""
    res = subprocess.run(
        ["ruff", "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
