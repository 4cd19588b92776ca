"""The linter's rules (``[tool.ruff]`` in pyproject.toml) hold over the library, scripts and tests."""

import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        pytest.skip("ruff is not installed (bash scripts/install.sh --dev installs it)")
    out = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_python_sources_compile():
    out = subprocess.run([sys.executable, "-m", "compileall", "-q", "lightning_peft", "scripts", "tests"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
