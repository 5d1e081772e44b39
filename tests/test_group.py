"""comm.group.RingGroup: collectives along an axis and the bytes they send, against NumPy
results computed from every rank's known input, on the world and on groups of 2."""
import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from comm import ring  # noqa: E402  (needs mpi4py)
from comm.group import RingGroup, ring_bytes_sent  # noqa: E402
from tests.mpi_util import Verdict, groups_of, skip_unless_ranks  # noqa: E402


# ---------------------------------------------------------------- pure: no MPI traffic

@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_bytes_follow_the_ring_docstring(p):
    """Reduce-scatter sends every block but r, all-gather every block but r+1; summed over
    ranks, an all-reduce moves 2(p-1) buffers and the others p-1."""
    for n in (0, 1, p - 1, p, 7, 4 * p, 1001):
        sizes = [len(b) for b in np.array_split(np.arange(n), p)]
        for r in range(p):
            rs = (n - sizes[r]) * 8
            ag = (n - sizes[(r + 1) % p]) * 8
            assert ring_bytes_sent("reduce_scatter", n, p, r, 8) == rs
            assert ring_bytes_sent("all_gather", n, p, r, 8) == ag
            assert ring_bytes_sent("all_reduce", n, p, r, 8) == rs + ag
        total = sum(ring_bytes_sent("all_reduce", n, p, r, 4) for r in range(p))
        assert total == 2 * (p - 1) * n * 4
        if n % p == 0:  # the textbook (p-1)/p of the buffer per rank
            assert ring_bytes_sent("all_gather", n, p, 0, 4) == (p - 1) * n // p * 4


def test_a_group_of_one_returns_its_input_itself():
    group = RingGroup(MPI.COMM_SELF)
    assert (group.size, group.rank) == (1, 0)
    x = np.arange(24.0).reshape(2, 3, 4)
    assert group.all_reduce(x) is x
    assert group.all_gather(x, 1) is x
    assert group.reduce_scatter(x, 2) is x
    np.testing.assert_array_equal(x, np.arange(24.0).reshape(2, 3, 4))
    assert group.bytes_sent == 0 and group.reset_bytes() == 0


# ---------------------------------------------------------------- under mpiexec

def inputs(p, shape, seed):
    """Every rank's input, the same arrays on every rank: [rank 0's, rank 1's, ...]."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(p)]


def check_group(comm, verdict, what):
    """all_reduce, all_gather and reduce_scatter along every axis of 3-D arrays, and 1-D
    buffers that do not split evenly (all_reduce), against NumPy; bytes after each."""
    group = RingGroup(comm)
    p, r = group.size, group.rank
    expected_bytes = 0

    def count(kind, n):
        nonlocal expected_bytes
        expected_bytes += ring_bytes_sent(kind, n, p, r, 8)
        verdict.close(f"{what}: bytes after {kind} of {n}", group.bytes_sent, expected_bytes,
                      rtol=0)

    for n in (1, 7, 4 * p + 1):  # uneven blocks, some empty when n < p
        xs = inputs(p, n, seed=n)
        buf = xs[r].copy()
        out = group.all_reduce(buf)
        with verdict.guard(f"{what}: all_reduce of {n} is in place"):
            assert out is buf
        verdict.close(f"{what}: all_reduce of {n}", out, np.sum(xs, axis=0), rtol=1e-12)
        count("all_reduce", n)

    shape = (2 * p, 3 * p, 2 * p)
    for axis in (0, 1, 2, -1):
        xs = inputs(p, shape, seed=10 + axis)
        parts = [np.split(x, p, axis=axis)[q] for q, x in enumerate(xs)]  # rank q's part
        mine = parts[r].copy()
        gathered = group.all_gather(mine, axis)
        count("all_gather", int(np.prod(shape)))
        with verdict.guard(f"{what}: all_gather along {axis}"):
            assert gathered.flags.c_contiguous and gathered.shape == shape
            np.testing.assert_array_equal(gathered, np.concatenate(parts, axis=axis))
            np.testing.assert_array_equal(mine, parts[r])  # the input is not changed

        full = xs[r].copy()
        scattered = group.reduce_scatter(full, axis)
        count("reduce_scatter", int(np.prod(shape)))
        expected = np.split(np.sum(xs, axis=0), p, axis=axis)[r]
        with verdict.guard(f"{what}: reduce_scatter along {axis}"):
            assert scattered.flags.c_contiguous and scattered.shape == expected.shape
            assert not np.shares_memory(scattered, full)
            np.testing.assert_array_equal(full, xs[r])  # the input is not changed
            np.testing.assert_allclose(scattered, expected, rtol=1e-12, atol=1e-14)

    with verdict.guard(f"{what}: reduce_scatter refuses an axis that does not divide"):
        with pytest.raises(ValueError, match="equal parts"):
            group.reduce_scatter(np.zeros((2, p + 1)), 1)
    with verdict.guard(f"{what}: reset_bytes"):
        assert group.reset_bytes() == expected_bytes and group.bytes_sent == 0
    return group


@pytest.mark.mpi(min_size=2)
def test_ring_group_on_the_world():
    skip_unless_ranks(4, "the world of 4")
    world, verdict = MPI.COMM_WORLD, Verdict()
    check_group(world, verdict, "world")
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_ring_group_on_groups_of_two():
    """Two groups at once on 4 ranks, each with its own inputs' sums."""
    world, verdict = MPI.COMM_WORLD, Verdict()
    sub = groups_of(world, 2)
    if sub is not None:
        group = check_group(sub, verdict, f"group of world rank {world.Get_rank()}")
        with verdict.guard("group rank follows world rank"):
            assert group.rank == world.Get_rank() % 2
        sub.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_bytes_summed_over_the_world():
    """The ring moves 2(p-1) buffers in an all-reduce, p-1 in the others, over all ranks."""
    world, verdict = MPI.COMM_WORLD, Verdict()
    group, p, n = RingGroup(world), world.Get_size(), 1000
    sent = []
    group.all_reduce(np.ones(n + 3))
    sent.append(group.reset_bytes())
    group.all_gather(np.ones((5, 2)), 0)
    sent.append(group.reset_bytes())
    group.reduce_scatter(np.ones((p, 5, 2)), 0)
    sent.append(group.reset_bytes())
    totals = world.allreduce(np.array(sent), op=MPI.SUM)
    with verdict.guard("totals"):
        assert list(totals) == [2 * (p - 1) * (n + 3) * 8, (p - 1) * 5 * p * 2 * 8,
                                (p - 1) * p * 5 * 2 * 8]
    verdict.check(world)


def test_ring_module_is_what_the_group_counts():
    """Blocks sent as ring_plan sends them: the bytes counted equal its sends' lengths."""
    for kind in ("all_reduce", "reduce_scatter", "all_gather"):
        for p, n in [(2, 9), (4, 7), (4, 64), (3, 1)]:
            for r in range(p):
                sends, _ = ring.ring_plan(kind, n, p, r, 2)
                assert sum(hi - lo for lo, hi, _ in sends) * 8 == \
                    ring_bytes_sent(kind, n, p, r, 8)
