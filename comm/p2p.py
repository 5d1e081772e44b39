"""Point-to-point transfers between pipeline stages: posted together, waited together.

A group of sends and receives is posted as Isend/Irecv and completed as one (the model the
schedule simulator checks). Each message carries a tag that names it (which micro-batch,
which virtual stage sent it, activation or gradient), so messages never cross.

Waiting polls and yields the core (MPICH's Waitall spins), under the watchdog
(comm/watchdog.py): a group still incomplete after `timeout` seconds prints what it waits
for and aborts the whole job, instead of leaving every rank hanging.

Staged (comm/backend.py: device arrays on an MPI that cannot read them), each message
travels in a host buffer from the pool: a send's is filled before its Isend, a receive's
copied to the device once the whole group is done.
"""
import os

from mpi4py import MPI

from comm import watchdog
from comm.backend import after_transfer, mpi_view, receive_buffer, send_buffer

ACTIVATION, GRADIENT = 0, 1


def message_tag(kind: int, mb: int, sender_virtual_stage: int, n_virtual: int) -> int:
    """The tag of one message: unique per (micro-batch, sending virtual stage, kind)."""
    return (mb * n_virtual + sender_virtual_stage) * 2 + kind


def exchange(comm, sends, recvs, timeout=None, what="transfer"):
    """sends/recvs: lists of (peer rank, contiguous array, tag). Returns when all are done.

    `what` describes the group for the watchdog's message."""
    received = [(buf, receive_buffer(buf)) for _, buf, _ in recvs]
    sent = [(buf, send_buffer(buf)) for _, buf, _ in sends]
    requests = [comm.Irecv(mpi_view(used), peer, tag)
                for (peer, _, tag), (_, used) in zip(recvs, received)]
    requests += [comm.Isend(mpi_view(used), peer, tag)
                 for (peer, _, tag), (_, used) in zip(sends, sent)]
    if not requests:
        return
    with watchdog.waiting(what, timeout):
        while not MPI.Request.Testall(requests):
            os.sched_yield()
    after_transfer(received, sent)
