"""comm/reducer.py: bucket layout, and bucketed reduction against MPI's own Allreduce."""
import numpy as np
import pytest

from comm import ring
from comm.reducer import GradReducer, ReducerError, _make_buckets
from tests.mpi_util import Verdict

TENSORS = {"a": (0, 10), "b": (10, 30), "c": (30, 31), "d": (31, 60), "e": (60, 64)}


def test_buckets_run_backwards_and_respect_the_cap():
    buckets = _make_buckets(TENSORS, max_elements=30, size=64)
    assert [b.names for b in buckets] == [["e"], ["d", "c"], ["b", "a"]]  # e+d is 33 > 30
    assert [(b.start, b.stop) for b in buckets] == [(60, 64), (30, 60), (0, 30)]
    # a tensor over the cap gets a bucket of its own
    assert [b.names for b in _make_buckets(TENSORS, 5, 64)] == [["e"], ["d"], ["c"], ["b"], ["a"]]
    # one big bucket
    assert [b.names for b in _make_buckets(TENSORS, 1000, 64)] == [["e", "d", "c", "b", "a"]]


def test_tensors_must_tile_the_buffer():
    with pytest.raises(ReducerError, match="ends at 30, expected 31"):
        _make_buckets({"a": (0, 10), "b": (10, 30), "d": (31, 64)}, 30, 64)
    with pytest.raises(ReducerError, match=r"leave \[0, 10\)"):
        _make_buckets({"b": (10, 64)}, 30, 64)


@pytest.mark.parametrize("size", [0, -1.0])
def test_bucket_size_must_be_positive(size):
    class OneRank:
        def Get_size(self):
            return 1

        def Get_rank(self):
            return 0

    with pytest.raises(ReducerError, match=f"bucket size {size!r} bytes: expected a number > 0"):
        GradReducer(OneRank(), np.zeros(64), TENSORS, size)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
def test_bucketed_reduction_equals_allreduce(shard, overlap):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    verdict = Verdict()
    # Every rank reaches every collective below whatever it found: checks only record.
    rng = np.random.default_rng(rank)
    tensors = {f"t{i}": (i * 1000 + 3 * i, (i + 1) * 1000 + 3 * (i + 1)) for i in range(7)}
    n = max(stop for _, stop in tensors.values())
    grads = np.empty(n)
    reducer = GradReducer(comm, grads, tensors, bucket_bytes=16_000, shard=shard,
                          overlap=overlap, segment_bytes=4096)
    for step in range(2):  # a reducer is reused step after step
        grads[:] = rng.normal(size=n)
        expected = grads.copy()
        comm.Allreduce(MPI.IN_PLACE, expected)
        reducer.begin_step()
        for name in reversed(list(tensors)):  # backward order: last tensor first
            reducer.ready([name])
        reducer.finish()
        for a, b in reducer.owned_ranges():
            # atol: sums of p values of order 1 may cancel to ~1e-5, where another
            # summation order than MPI's differs in the last bits
            verdict.close(f"step {step} [{a}, {b})", grads[a:b], expected[a:b], rtol=1e-12,
                          atol=1e-14)
    owned = reducer.owned_ranges()
    if shard:  # the shards of all ranks tile the buffer exactly once
        everyone = sorted(r for ranges in comm.allgather(owned) for r in ranges)
        with verdict.guard("shards tile the buffer"):
            assert everyone[0][0] == 0 and everyone[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(everyone, everyone[1:]))
        params = np.full(n, -1.0)
        for a, b in owned:
            params[a:b] = rank
        reducer.gather_params(params)
        owner = np.empty(n)
        for r, ranges in enumerate(comm.allgather(owned)):
            for a, b in ranges:
                owner[a:b] = r
        verdict.close("gathered parameters", params, owner, rtol=0)
    else:
        with verdict.guard("owned"):
            assert owned == [(0, n)]
    verdict.check(comm)


def test_ring_api_used_by_the_reducer_exists():
    for name in ("iall_reduce", "ireduce_scatter", "iall_gather", "shard_bounds",
                 "DEFAULT_SEGMENT_BYTES"):
        assert hasattr(ring, name)
