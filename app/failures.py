"""How a job ends when something goes wrong: all ranks together, with one line, never hanging.

- Set-up (config, layout, data, run directory, memory) runs inside `together(comm)`: each
  rank's UserError is caught, one `allgather` tells every rank about every failure, and all
  ranks raise the same error, marked `everywhere`. Rank 0 prints it once; every rank exits
  with status 2. Nobody is left inside a collective, so no abort is needed.
- Anything later that only some ranks meet (a damaged batch, a bug, one rank's Ctrl-C) is
  printed by that rank with its number, and `MPI_Abort` ends every rank at once, as
  `python -m mpi4py` does for an uncaught exception.
- A rank blocked on a peer that died without a word is ended by the watchdog
  (comm/watchdog.py).
"""
import sys
import time
import traceback
from contextlib import contextmanager

from app.errors import UserError
from comm import watchdog

# Ranks other than 0 wait this long before reporting a Ctrl-C: mpiexec delivers SIGINT to
# every rank, and rank 0's abort normally ends them first, so the user sees one line.
INTERRUPT_GRACE_S = 2.0


@contextmanager
def together(comm):
    """Runs the body on every rank of `comm`; if any rank raised a UserError, every rank
    raises one (naming the first failing rank unless all failed alike). The body must not
    enter a collective after a statement that can fail on some ranks only."""
    failure = None
    try:
        yield
    except UserError as err:
        failure = str(err)
    with watchdog.waiting("the other ranks to finish their set-up"):
        failures = comm.allgather(failure) if comm.Get_size() > 1 else [failure]
    failed = [(rank, message) for rank, message in enumerate(failures) if message]
    if not failed:
        return
    if len(failed) == len(failures) and len({m for _, m in failed}) == 1:
        raise UserError(failed[0][1], everywhere=True)
    rank, message = failed[0]
    raise UserError(f"rank {rank}: {message}", everywhere=True)


def mpi_world():
    """(rank, size) of the MPI job, or (0, 1) when MPI was never started."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return 0, 1
    return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()


def end_job(kind, message, status, everywhere=False):
    """Prints `kind: message` once and ends this rank (and, if needed, the job) with `status`.

    Returns the status where a normal exit is safe: one process, or an error that every rank
    raised at the same point. Otherwise names this rank, aborts the whole job and does not
    return."""
    rank, size = mpi_world()
    if size == 1 or everywhere:
        if rank == 0:
            watchdog.say(f"{kind}: {message}")
        return status
    watchdog.abort_job(f"{kind}: rank {rank}: {message}", status)
    return status  # not reached


def run_guarded(command):
    """Runs `command()` and turns every way it can fail into one line and an exit status."""
    try:
        return command() or 0
    except UserError as err:
        return end_job("error", err, 2, err.everywhere)
    except KeyboardInterrupt:
        if mpi_world()[0] != 0:
            time.sleep(INTERRUPT_GRACE_S)
        return end_job("interrupted", "stopped by Ctrl-C (SIGINT)", 130)
    except MemoryError:
        return end_job("error", "out of memory: use a smaller batch_size, block_size or "
                       "model, or more ranks", 2)
    except Exception as err:  # a bug: keep the traceback, then the one line that matters
        traceback.print_exc()
        return end_job("internal error", f"{type(err).__name__}: {err} (a bug: please "
                       "report it with the traceback above)", 1)
