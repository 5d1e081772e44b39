"""Under MPI, the ranks' slices of a batch put together are exactly the global batch."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from app.data import BatchLoader, TokenData
from app.prepare import prepare

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.mark.mpi(min_size=2)
def test_rank_slices_gather_to_the_global_batch():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # Not tmp_path: each rank's pytest would make (and prune) its own directories.
    workdir, ok, detail = None, True, ""
    if rank == 0:
        try:
            workdir = Path(tempfile.mkdtemp(prefix="test_data_mpi."))
            rng = np.random.default_rng(0)
            words = rng.choice(["alpha", "beta", "gamma", "δέλτα", "\n"], size=3000)
            (workdir / "corpus.txt").write_text(" ".join(words), encoding="utf-8")
            prepare([workdir / "corpus.txt"], workdir / "tokens.h5")
        except Exception as err:  # reported by every rank below rather than left hanging
            ok, detail = False, f"rank 0 setup: {err!r}"
    workdir, ok, detail = comm.bcast((workdir, ok, detail), root=0)

    # Local work first, then exactly one collective that every rank reaches, so an
    # exception on one rank fails the test everywhere instead of hanging the others.
    steps, mine, expected = (0, 1, 57), [], []
    try:
        if not ok:
            raise RuntimeError(detail)
        with TokenData(workdir / "tokens.h5") as data:
            loader = BatchLoader(data, "train", 32, 3 * size, seed=11)
            for step in steps:
                mine.append(loader.batch(step, rank, size))
                expected.append(loader.batch(step))
    except Exception as err:
        ok, detail = False, f"rank {rank}: {err!r}"
    gathered = comm.allgather((ok, detail, mine))
    if rank == 0 and workdir is not None:  # every rank has closed the file by now
        shutil.rmtree(workdir, ignore_errors=True)

    failures = [d for o, d, _ in gathered if not o]
    assert not failures, failures
    for i, (gx, gy) in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([g[2][i][0] for g in gathered]), gx)
        np.testing.assert_array_equal(np.concatenate([g[2][i][1] for g in gathered]), gy)
