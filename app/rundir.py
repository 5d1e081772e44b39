"""Run directories: never written over silently, never written by two jobs at once.

A run directory holds `config.toml`, `metrics.jsonl`, `params.h5`, `checkpoints/` and a
`.lock`. Rank 0 `claim`s it before writing anything:

- an exclusive `flock` on `.lock`, held until the job ends, keeps a second job out (with a
  line naming the holder's pid, host and start). The kernel drops the lock when the process
  dies, even by SIGKILL, so a crashed job never leaves a stale lock behind. (On NFS, Linux
  maps flock to byte-range locks, which the server arbitrates.)
- a directory that already holds a run is refused unless `resume` (continue it) or
  `overwrite`; with the latter, the old run's files are deleted first, so a failed rerun
  never leaves a new config.toml beside an old params.h5.

Without `--out`, `fresh_run_dir("runs/baby")` picks runs/baby, else runs/baby-2, -3, ...
"""
import datetime
import fcntl
import os
import shutil
import socket
from pathlib import Path

from app.errors import UserError

RUN_FILES = ("config.toml", "metrics.jsonl", "params.h5", "best.h5", "checkpoints")
LOCK_NAME = ".lock"


def run_files(path) -> list:
    """The files of a run already in `path` (empty for a new or unrelated directory)."""
    path = Path(path)
    return [name for name in RUN_FILES if (path / name).exists()]


def fresh_run_dir(base) -> str:
    """`base` if it holds no run, else the first `base-N` (N = 2, 3, ...) that holds none."""
    candidate, n = str(base), 1
    while run_files(candidate) or _locked(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


class RunDir:
    """A claimed run directory; `release()` (or the end of the process) frees it."""

    def __init__(self, path, lock_file):
        self.path = Path(path)
        self._lock_file = lock_file

    def release(self):
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None


def claim(path, overwrite=False, resume=False) -> RunDir:
    """Creates and locks the run directory `path` for this job (see the module doc); with
    `resume`, a run already there is kept, to be continued."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: is a file, expected a run directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock_file = open(path / LOCK_NAME, "a+", encoding="utf-8")
    except OSError as err:
        raise UserError(f"--out {path}: cannot create the run directory ({err.strerror or err})"
                        ": expected a writable location") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise UserError(f"--out {path}: another job is writing this run directory "
                        f"({holder}): expected a directory no running job uses") from None
    try:
        existing = run_files(path)
        if existing and not (overwrite or resume):
            raise UserError(f"--out {path} already holds a run ({', '.join(existing)}): pass "
                            "--resume auto to continue it, --overwrite to replace it, or "
                            "choose another --out")
        for name in existing if overwrite else ():
            if (path / name).is_dir():
                shutil.rmtree(path / name)  # checkpoints/
            else:
                os.unlink(path / name)
        lock_file.truncate(0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        lock_file.flush()
    except OSError as err:
        lock_file.close()
        raise UserError(f"--out {path}: cannot write the run directory ({err.strerror or err})"
                        ": expected a writable location") from None
    except BaseException:
        lock_file.close()
        raise
    return RunDir(path, lock_file)


def _locked(path) -> bool:
    """True if a running job holds `path`'s lock."""
    try:
        with open(Path(path) / LOCK_NAME, "r", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
