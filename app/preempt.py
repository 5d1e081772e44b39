"""Stopping cleanly when the scheduler asks: a signal sets a flag, the ranks agree at a step
boundary, the trainer saves a checkpoint and exits with REQUEUE_EXIT_CODE.

- `install()` makes SIGTERM and SIGUSR1 set a flag in this process. The handler does nothing
  else: no I/O, no MPI (neither is safe in a signal handler, and a rank may be inside a
  collective when the signal lands). `uninstall()` puts the previous handlers back.
- `stop_requested(comm)` combines the flags of all ranks with one small MAX all-reduce, so
  every rank gets the same answer at the same step even when the signal reached some ranks
  only (or reached them a few ms apart, as a forwarded signal does). Call it at every step
  boundary on every rank of `comm`; it is under the watchdog like every other wait.
- `stop_signal()` names the signal agreed on ("SIGTERM" wins over "SIGUSR1"), for the log
  line, on every rank.

Who sends what (see slurm/README.md): Slurm sends SIGUSR1 `--signal` seconds before the time
limit (our sbatch scripts forward it from the batch shell to the ranks), SIGTERM at the limit,
on preemption and on `scancel`, then SIGKILL after KillWait (30 s by default). MPICH's
mpiexec forwards SIGTERM and SIGUSR1 to every rank; Open MPI's forwards SIGUSR1 but turns
SIGTERM into SIGTERM + SIGKILL a quarter of a second later, so send it SIGUSR1. SIGINT stays
Ctrl-C (KeyboardInterrupt, app/failures.py).

REQUEUE_EXIT_CODE is 75, EX_TEMPFAIL of BSD's sysexits.h: "a temporary failure; the user is
invited to retry later", the code mail systems and other schedulers' wrappers read as "try
again". It is not 0, so a stopped run never passes for a finished one (`sbatch
--dependency=afterok`, `make`, `set -e`), and it is none of our others (1 bug, 2 user error,
3 watchdog, 130 Ctrl-C) nor 128+N, which shells use for death by signal N. Slurm gives the
number no meaning of its own; a site may list it in slurm.conf's `RequeueExit`.
"""
import signal

import numpy as np

from comm import watchdog

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received = 0      # the highest signal number received since install(), 0 for none
_agreed = 0        # the highest across ranks, as of the last stop_requested()
_previous = {}     # signal number -> the handler install() replaced


def _handler(signum, frame):
    global _received
    _received = max(_received, signum)  # only this: a flag for the next step boundary


def install(signals=SIGNALS):
    """Makes `signals` set the stop flag (cleared now). From the main thread only, as Python
    requires of every signal handler; installing twice keeps the first handlers to restore."""
    global _received, _agreed
    _received = _agreed = 0
    for sig in signals:
        previous = signal.signal(sig, _handler)
        _previous.setdefault(sig, previous)


def uninstall():
    """Puts back the handlers install() replaced. The flag is kept, for a last look."""
    while _previous:
        sig, previous = _previous.popitem()
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


class installed:
    """`with preempt.installed():` install() on entry, uninstall() on exit."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals

    def __enter__(self):
        install(self.signals)
        return self

    def __exit__(self, *exc):
        uninstall()


def received():
    """The name of the signal this process received ("SIGUSR1"), or None."""
    return _name(_received)


def stop_requested(comm=None) -> bool:
    """True on every rank of `comm` once any rank received a stop signal. A collective: every
    rank of `comm` must call it at the same point (each step boundary). comm None or of
    size 1: this process's flag alone."""
    global _agreed
    if comm is None or comm.Get_size() == 1:
        _agreed = _received
    else:
        from mpi4py import MPI
        flags = np.array([_received], dtype=np.int32)
        with watchdog.waiting("the other ranks at the step boundary (stop-signal check)"):
            comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
        _agreed = int(flags[0])
    return _agreed != 0


def pending() -> int:
    """The signal number this process received (0: none), to pass on to whoever agrees."""
    return _received


def adopt(signum: int):
    """Takes a stop agreed elsewhere (by the parameter servers) as this rank's agreement."""
    global _agreed
    _agreed = signum


def stop_signal():
    """The signal agreed on by the last stop_requested() ("SIGTERM" if any rank got one,
    else "SIGUSR1"), or None."""
    return _name(_agreed)


def _name(signum):
    return signal.Signals(signum).name if signum else None
