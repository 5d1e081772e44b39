"""comm/watchdog.py: a rank stuck waiting on its peers ends the whole job, naming the wait."""
import subprocess
import sys
import time

import pytest

from app_util import ENV, MPIEXEC, ROOT
from comm import watchdog

STUCK_IN_A_COLLECTIVE = """
import time
from mpi4py import MPI
from comm import watchdog
comm = MPI.COMM_WORLD
watchdog.arm(1.0)
if comm.Get_rank() == 0:  # MPI's own blocking call: never returns to Python while waiting
    with watchdog.waiting("the digests of step 7"):
        comm.allgather(0)
else:
    time.sleep(60)        # a peer stuck in computation (or dead without a word)
"""


def test_a_rank_stuck_in_a_blocking_collective_aborts_the_job():
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    start = time.monotonic()
    result = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-c",
                             STUCK_IN_A_COLLECTIVE], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=60)
    elapsed = time.monotonic() - start
    seen = f"exit {result.returncode} after {elapsed:.1f} s; stderr:\n{result.stderr}"
    assert result.returncode == watchdog.ABORT_CODE, seen
    assert elapsed < 30, seen  # rank 1's 60 s sleep was cut short by the abort
    assert "watchdog: rank 0 waited more than 1 s for the digests of step 7; aborting the " \
           "job" in result.stderr, seen


def test_waits_inside_the_timeout_and_unarmed_waits_pass():
    watchdog.arm(None)
    with watchdog.waiting("nothing"):  # no timeout anywhere: not watched
        time.sleep(0.2)
    with watchdog.waiting("a quick wait", timeout=5.0):
        time.sleep(0.3)  # the thread runs, and finds nothing overdue
    with watchdog.waiting("outer", timeout=5.0):
        with watchdog.waiting("inner", timeout=5.0):
            pass
        assert watchdog._current[0] == "outer"  # the inner wait gives the slot back
    assert watchdog._current is None
