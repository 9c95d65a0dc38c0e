"""The repository conftest's failure log: tracebacks written as failures happen."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_failures_are_logged_as_they_happen(tmp_path, workers):
    tests = tmp_path / "t"
    tests.mkdir()
    # The repository's hook, under another module name than the conftest that re-exports it.
    (tests / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('repo_conftest', {str(ROOT / 'conftest.py')!r})\n"
        "repo = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(repo)\n"
        "pytest_runtest_logreport = repo.pytest_runtest_logreport\n")
    (tests / "test_some.py").write_text(
        "def test_ok():\n    pass\n\n"
        "def test_wrong():\n    assert 1 + 1 == 3, 'arithmetic'\n\n"
        "def test_hangs():\n    import time\n    time.sleep(600)\n")
    log = tmp_path / "failures.txt"
    env = {**os.environ, "DD_PYTEST_FAILURE_LOG": str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tests)]
    if workers:
        cmd += ["-n", str(workers)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Killed while a test hangs, as the GPU command's time limit does: the log already holds
    # the failure, which pytest's own end-of-run report would only have printed later.
    try:
        for _ in range(600):
            if log.exists() and "arithmetic" in log.read_text():
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        out = proc.communicate()[0]
    text = log.read_text() if log.exists() else ""
    assert "test_some.py::test_wrong (call)" in text and "arithmetic" in text, out[-2000:]
    assert "test_ok" not in text and text.count("=====") == 1
