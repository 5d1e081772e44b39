"""app/rundir.py: a run directory is never written over silently, nor by two jobs at once."""
import subprocess
import sys

import pytest

from app import rundir
from app.errors import UserError
from app_util import app, assert_user_error, ENV, FAST


def fake_run(path, *names):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text("old")


def test_a_new_directory_is_created_locked_and_released(tmp_path):
    run = rundir.claim(tmp_path / "a" / "run")
    assert run.path.is_dir() and (run.path / rundir.LOCK_NAME).is_file()
    assert "pid " in (run.path / rundir.LOCK_NAME).read_text()
    assert rundir._locked(run.path)
    run.release()
    assert not rundir._locked(run.path)
    rundir.claim(run.path).release()  # a lock file alone is no run


def test_an_existing_run_is_refused_without_overwrite(tmp_path):
    fake_run(tmp_path / "run", "config.toml", "params.h5")
    with pytest.raises(UserError, match=r"--out .*run already holds a run \(config.toml, "
                                        r"params.h5\): pass --resume auto to continue it, "
                                        r"--overwrite to replace it"):
        rundir.claim(tmp_path / "run")
    assert (tmp_path / "run" / "params.h5").read_text() == "old"


def test_overwrite_removes_the_old_run_first(tmp_path):
    fake_run(tmp_path / "run", *rundir.RUN_FILES, "notes.txt")
    run = rundir.claim(tmp_path / "run", overwrite=True)
    assert rundir.run_files(run.path) == []
    assert (run.path / "notes.txt").exists()  # not ours: left alone
    run.release()


def test_a_directory_in_use_is_refused_even_with_overwrite(tmp_path):
    holder = rundir.claim(tmp_path / "run")
    with pytest.raises(UserError, match=r"another job is writing this run directory \(pid "):
        rundir.claim(tmp_path / "run", overwrite=True)
    holder.release()


def test_the_lock_dies_with_its_process(tmp_path):
    """A job killed with SIGKILL leaves no stale lock: the kernel drops it."""
    code = ("import time; from app import rundir; "
            f"run = rundir.claim({str(tmp_path / 'run')!r}); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert rundir._locked(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert not rundir._locked(tmp_path / "run")


def test_fresh_names_skip_directories_that_hold_runs(tmp_path):
    base = tmp_path / "runs" / "baby"
    assert rundir.fresh_run_dir(base) == str(base)
    fake_run(base, "metrics.jsonl")
    assert rundir.fresh_run_dir(base) == f"{base}-2"
    fake_run(tmp_path / "runs" / "baby-2", "config.toml")
    assert rundir.fresh_run_dir(base) == f"{base}-3"


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, expected a run directory"):
        rundir.claim(tmp_path / "f")


# --------------------------------------------------------------------------- the CLI


def test_train_refuses_to_overwrite_and_overwrites_when_asked(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert app("train", *FAST, "--data", tiny_h5, "--out", out).returncode == 0
    before = (out / "params.h5").read_bytes()
    again = app("train", *FAST, "--data", tiny_h5, "--out", out, "--seed", "5")
    assert_user_error(again, f"--out {out} already holds a run", "--overwrite")
    assert (out / "params.h5").read_bytes() == before
    replaced = app("train", *FAST, "--data", tiny_h5, "--out", out, "--seed", "5",
                   "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "params.h5").read_bytes() != before
    assert "seed = 5" in (out / "config.toml").read_text()


def test_a_failed_rerun_with_overwrite_leaves_no_old_parameters(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert app("train", *FAST, "--data", tiny_h5, "--out", out).returncode == 0
    failed = app("train", *FAST, "--steps", "20", "--lr", "1e9", "--grad-clip", "0",
                 "--data", tiny_h5, "--out", out, "--overwrite")
    assert_user_error(failed, "loss or gradient norm not finite")
    assert rundir.run_files(out) == ["config.toml", "metrics.jsonl"]  # no stale params.h5


def test_a_second_concurrent_run_into_one_directory_is_refused(tiny_h5, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "app", "train", *FAST, "--steps",
                              "100000", "--log-interval", "1", "--data", str(tiny_h5),
                              "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in first.stdout:
            if "| loss " in line:
                break
        second = app("train", *FAST, "--data", tiny_h5, "--out", out, "--overwrite")
        assert_user_error(second, f"--out {out}: another job is writing this run directory",
                          f"pid {first.pid}")
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.communicate()


def test_without_out_each_run_gets_a_fresh_directory(tiny_h5, tmp_path):
    for _ in range(2):
        result = app("train", *FAST, "--data", tiny_h5, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny", "tiny-2"]
    assert "run directory runs/tiny-2 holds" in result.stdout
