"""Point-to-point transfers between pipeline stages: posted together, waited together.

A group of sends and receives is posted as Isend/Irecv and completed as one (the model the
schedule simulator checks). Each message carries a tag that names it (which micro-batch,
which virtual stage sent it, activation or gradient), so messages never cross.

Waiting polls and yields the core (MPICH's Waitall spins), under the watchdog
(comm/watchdog.py): a group still incomplete after `timeout` seconds prints what it waits
for and aborts the whole job, instead of leaving every rank hanging.
"""
import os

from mpi4py import MPI

from comm import watchdog

ACTIVATION, GRADIENT = 0, 1


def message_tag(kind: int, mb: int, sender_virtual_stage: int, n_virtual: int) -> int:
    """The tag of one message: unique per (micro-batch, sending virtual stage, kind)."""
    return (mb * n_virtual + sender_virtual_stage) * 2 + kind


def exchange(comm, sends, recvs, timeout=None, what="transfer"):
    """sends/recvs: lists of (peer rank, contiguous array, tag). Returns when all are done.

    `what` describes the group for the watchdog's message."""
    requests = [comm.Irecv(buf, peer, tag) for peer, buf, tag in recvs]
    requests += [comm.Isend(buf, peer, tag) for peer, buf, tag in sends]
    if not requests:
        return
    with watchdog.waiting(what, timeout):
        while not MPI.Request.Testall(requests):
            os.sched_yield()
