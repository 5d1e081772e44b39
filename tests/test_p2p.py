"""comm/p2p.py: tags never collide; staged transfers deliver; the watchdog ends a job stuck
in a transfer."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from comm.p2p import ACTIVATION, GRADIENT, exchange, message_tag
from tests.mpi_util import Verdict

ROOT = Path(__file__).resolve().parents[1]


def test_tags_are_unique_per_message():
    tags = {message_tag(kind, mb, v, 8) for kind in (ACTIVATION, GRADIENT) for mb in range(40)
            for v in range(8)}
    assert len(tags) == 2 * 40 * 8


@pytest.mark.mpi(min_size=2)
def test_staged_exchange_delivers_every_message_in_shape_through_host_buffers():
    from mpi4py import MPI

    from comm import backend
    world, verdict = MPI.COMM_WORLD, Verdict()
    rank, size = world.Get_rank(), world.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    outgoing = [np.full((3, 5), rank, np.float64), np.arange(7, dtype=np.int64) * rank]
    incoming = [np.empty((3, 5)), np.empty(7, np.int64)]
    with verdict.guard("staged exchange"):
        before = backend.staged_bytes[0]
        with backend.forced_host_staging():
            for _ in range(2):  # the second time from the pool's buffers
                exchange(world, [(right, buf, tag) for tag, buf in enumerate(outgoing)],
                         [(left, buf, tag) for tag, buf in enumerate(incoming)], timeout=60)
        np.testing.assert_array_equal(incoming[0], np.full((3, 5), left))
        np.testing.assert_array_equal(incoming[1], np.arange(7) * left)
        assert backend.staged_bytes[0] - before == 2 * 2 * (15 * 8 + 7 * 8)
    verdict.check(world)


STUCK = """
import time
from mpi4py import MPI
import numpy as np
from comm.p2p import exchange
comm = MPI.COMM_WORLD
if comm.Get_rank() == 0:  # waits for an activation that rank 1 never sends
    exchange(comm, [], [(1, np.empty(4), 7)], timeout=1.0, what="stage 0: RecvActivation(3)")
else:
    time.sleep(60)
"""


def test_watchdog_names_the_stuck_transfer_and_aborts_the_job():
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    start = time.monotonic()
    result = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", STUCK], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    # Everything seen, for a failure on a loaded machine: the exit, the time, the output.
    seen = (f"exit {result.returncode} after {elapsed:.1f} s\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}")
    assert result.returncode != 0, seen
    assert elapsed < 55, seen  # rank 1's 60 s sleep was cut short by the abort
    assert "watchdog: rank 0 waited more than 1 s for stage 0: RecvActivation(3); " \
           "aborting the job" in result.stderr, seen
