"""No rank waits forever: a thread that ends the whole job when a blocking wait overruns.

Every place that blocks on other ranks runs inside `waiting(what)`: the ring collectives'
`wait()`, pipeline transfers, and the trainer's small collectives (`bcast`, `allgather`).
A daemon thread looks at the wait in progress a few times a second; once one is older than
its timeout, it prints one line naming the rank and what it waited for, and calls
`MPI_Abort`, which ends every rank of the job. A peer that died or raised, a mismatched
collective, a lost message: all end the same way, within the timeout plus a fraction of a
second, instead of burning the allocation until Slurm's limit.

A thread rather than a deadline in each polling loop, because MPI's own blocking calls
(`bcast`, `allgather`, `Split`) never return to Python while they wait; mpi4py releases the
GIL inside them, so the thread still runs (mpi4py asks for MPI_THREAD_MULTIPLE, which makes
calling `Abort` from it legal).

The default timeout is set once per job by `arm(seconds)` (the `timeout` config key);
`waiting(what, timeout)` may set its own. With neither, waits are not watched.

`abort_job(line, status)` is the one way a rank ends the job: the watchdog uses it, and so
does app/failures.py for an error only some ranks meet.
"""
import sys
import threading
import time

ABORT_CODE = 3
ABORT_DELAY_S = 0.3  # lets mpiexec forward the last line before MPI_Abort tears the job down

_default_timeout = None
_current = None  # (what, deadline, timeout) of the wait in progress; one assignment = atomic
_thread = None
_lock = threading.Lock()


def arm(timeout):
    """Watches every later wait with this timeout in seconds (None: only explicit ones)."""
    global _default_timeout
    _default_timeout = timeout
    if timeout is not None:
        _start_thread()


class waiting:
    """`with waiting(what):` marks a blocking wait on other ranks; `what` says what for, in the
    abort message. A class, not a generator: 1.8 us a wait when armed, message included,
    which a 4 KB ring all-reduce (22 us) hardly notices; the @contextmanager form took 5 us."""

    __slots__ = ("_wait", "_outer")

    def __init__(self, what, timeout=None):
        timeout = _default_timeout if timeout is None else timeout
        self._wait = None if timeout is None else (what, timeout)

    def __enter__(self):
        global _current
        if self._wait is not None:
            if _thread is None:
                _start_thread()
            self._outer = _current
            what, timeout = self._wait
            _current = (what, time.monotonic() + timeout, timeout)

    def __exit__(self, *exc):
        global _current
        if self._wait is not None:
            _current = self._outer


def _start_thread():
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="watchdog", daemon=True)
            _thread.start()


def _watch():
    while True:
        time.sleep(0.1)
        wait = _current
        if wait is not None and time.monotonic() > wait[1]:
            _abort(*wait)


def _abort(what, deadline, timeout):
    from mpi4py import MPI
    abort_job(f"watchdog: rank {MPI.COMM_WORLD.Get_rank()} waited more than {timeout:g} s "
              f"for {what}; aborting the job", ABORT_CODE)


def say(line):
    """One line on stderr, in one write: under mpiexec every rank's line arrives whole."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def abort_job(line, status):
    """Prints `line` and ends every rank of the job with `status` (MPI_Abort)."""
    from mpi4py import MPI
    say(line)
    # mpiexec forwards stderr through a pipe; an abort at once may end the job before the
    # line has gone through (seen with MPICH's hydra, about one run in ten).
    time.sleep(ABORT_DELAY_S)
    MPI.COMM_WORLD.Abort(status)
