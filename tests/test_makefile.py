"""Makefile: `make clean` removes build leftovers only; runs and data need `make clean-runs`."""
import shutil
import subprocess

import pytest

from app_util import ROOT


@pytest.fixture
def tree(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for path in ("runs/baby/params.h5", "data/embedded.h5", "app/__pycache__/x.pyc",
                 ".pytest_cache/v", ".venv/lib/__pycache__/y.pyc"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    return tmp_path


def make(tree, target):
    result = subprocess.run(["make", "-s", target], cwd=tree, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_clean_keeps_runs_data_and_the_venv(tree):
    make(tree, "clean")
    assert (tree / "runs/baby/params.h5").exists() and (tree / "data/embedded.h5").exists()
    assert (tree / ".venv/lib/__pycache__/y.pyc").exists()
    assert not (tree / "app/__pycache__").exists() and not (tree / ".pytest_cache").exists()


def test_clean_runs_says_what_it_deletes(tree):
    result = make(tree, "clean-runs")
    assert "deleting runs/" in result.stdout and "data/" in result.stdout
    assert not (tree / "runs").exists() and not (tree / "data").exists()
