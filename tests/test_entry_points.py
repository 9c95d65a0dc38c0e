"""Every command is a console script ([project.scripts]) and a `python -m` module, and both start."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_and_module_answer_help(name):
    module = SCRIPTS[name].split(":")[0]
    script = Path(sys.executable).parent / name
    assert script.is_file(), f"{name} is not installed (pip install -e . after editing pyproject.toml)"
    for cmd in ([str(script), "--help"], [sys.executable, "-m", module, "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        assert "usage:" in r.stdout.lower(), (cmd, r.stdout[:500])
