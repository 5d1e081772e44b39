"""Helpers for tests that run under `mpiexec -n N python -m pytest --with-mpi`.

The rule they enforce: a rank never raises before the collective that ends a test. Each
rank records its own verdict, one `allgather` shares all verdicts, and only then does any
rank assert, so a failure on one rank fails the test everywhere instead of hanging it.
"""
import shutil
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest


class Verdict:
    """Collects this rank's failures; `check(comm)` combines all ranks' and asserts."""

    def __init__(self):
        self.failures = []

    @contextmanager
    def guard(self, what):
        try:
            yield
        except Exception as err:  # recorded, then reported by every rank together
            self.failures.append(f"{what}: {err!r}\n{traceback.format_exc(limit=3)}")

    def close(self, what, actual, expected, rtol, atol=0.0):
        with self.guard(what):
            np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)

    def check(self, comm):
        everyone = comm.allgather(self.failures)
        failures = [f"rank {r}: {f}" for r, fs in enumerate(everyone) for f in fs]
        assert not failures, "\n".join(failures)


@contextmanager
def shared_tmpdir(comm):
    """A temporary directory made by rank 0 and known to all ranks; removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="mpi_test.")) if comm.Get_rank() == 0 else None
    path = comm.bcast(path, root=0)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


def skip_unless_ranks(needed, what):
    """Skips the test when the job has fewer than `needed` ranks: a decision that depends on
    the world size only, so every rank takes it alike and none is left in a collective."""
    from mpi4py import MPI
    have = MPI.COMM_WORLD.Get_size()
    if have < needed:
        pytest.skip(f"{what} needs {needed} ranks, have {have}")


def groups_of(comm, size):
    """Splits comm into groups of `size` consecutive ranks; ranks left over get None."""
    rank, world = comm.Get_rank(), comm.Get_size()
    from mpi4py import MPI
    member = rank < (world // size) * size
    sub = comm.Split(color=rank // size if member else MPI.UNDEFINED, key=rank)
    return sub if member else None


def against_reference(size, name, reference, run):
    """The frame of an equivalence test under MPI: skips (with the reason) without `size`
    ranks; every rank computes `reference()`; each group of `size` ranks calls
    `run(group, verdict, reference's result)`; the verdict is combined over all ranks, so a
    failure on one rank leaves none waiting."""
    skip_unless_ranks(size, name)
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        expected = reference()
    group = groups_of(world, size)
    if group is not None:
        with verdict.guard(name):
            run(group, verdict, expected)
        group.Free()
    verdict.check(world)
