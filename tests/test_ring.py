"""Ring collectives: the schedule simulated in one process, then the real thing under MPI
against MPI.Allreduce / Reduce_scatter / Allgatherv."""
import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from comm import ring  # noqa: E402  (needs mpi4py)
from tests.mpi_util import Verdict, groups_of  # noqa: E402

KINDS = ("all_reduce", "reduce_scatter", "all_gather")
DTYPES = (np.float32, np.float64)


# ---------------------------------------------------------------- pure: no MPI traffic

@pytest.mark.parametrize("p", range(1, 9))
def test_shard_bounds_match_array_split(p):
    for n in list(range(0, 3 * p + 2)) + [1000, 1000003]:
        bounds = [ring.shard_bounds(n, p, r) for r in range(p)]
        sizes = [len(part) for part in np.array_split(np.arange(n), p)]
        assert [hi - lo for lo, hi in bounds] == sizes
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(p - 1))


def test_schedule_indexing_for_p3():
    """The docstring's table: in RS step s rank r sends (r-s-1)%p and adds (r-s-2)%p."""
    assert ring.ring_schedule("all_reduce", 3, 0) == [(2, 1, True), (1, 0, True),
                                                      (0, 2, False), (2, 1, False)]
    assert ring.ring_schedule("all_gather", 3, 1) == [(1, 0, False), (0, 2, False)]
    assert ring.ring_schedule("reduce_scatter", 1, 0) == []
    with pytest.raises(ValueError, match="kind"):
        ring.ring_schedule("broadcast", 2, 0)


def inputs(kind, n, p, seed=0):
    """Integer-valued float64 inputs of p ranks; all-gather's non-owned blocks are NaN."""
    rng = np.random.default_rng(seed)
    bufs = [rng.integers(-100, 100, n).astype(np.float64) for _ in range(p)]
    if kind == "all_gather":
        for r, buf in enumerate(bufs):
            lo, hi = ring.shard_bounds(n, p, r)
            buf[:lo] = buf[hi:] = np.nan
    return bufs


def check_result(kind, before, after):
    p, n = len(before), before[0].size
    total = np.sum(before, axis=0)
    for r in range(p):
        lo, hi = ring.shard_bounds(n, p, r)
        if kind == "all_reduce":
            np.testing.assert_array_equal(after[r], total, err_msg=f"rank {r}")
        elif kind == "reduce_scatter":
            np.testing.assert_array_equal(after[r][lo:hi], total[lo:hi], err_msg=f"rank {r}")
        else:
            gathered = np.concatenate([before[q][slice(*ring.shard_bounds(n, p, q))]
                                       for q in range(p)])
            np.testing.assert_array_equal(after[r], gathered, err_msg=f"rank {r}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", range(1, 9))
def test_step_schedule_simulated(kind, p):
    """Every rank does its step at once: send a copy to r+1, then add it or store it."""
    for n in (0, 1, p - 1, p, 3 * p + 1, 100):
        before = inputs(kind, n, p)
        bufs = [b.copy() for b in before]
        steps = [ring.ring_schedule(kind, p, r) for r in range(p)]
        for s in range(len(steps[0])):
            sent = [bufs[r][slice(*ring.shard_bounds(n, p, steps[r][s][0]))].copy()
                    for r in range(p)]
            for r in range(p):
                _, block, add = steps[r][s]
                lo, hi = ring.shard_bounds(n, p, block)
                incoming = sent[(r - 1) % p]  # what r-1 sent must be the block r receives
                assert incoming.size == hi - lo
                bufs[r][lo:hi] = bufs[r][lo:hi] + incoming if add else incoming
        check_result(kind, before, bufs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
def test_segment_plan_simulated(kind, p):
    """Messages delivered in a random order that `ring_plan`'s waits allow (each link in
    order, as MPI does): the result is right and nothing is left undelivered. A send reads
    its data when delivered, so a missing wait would show up as a wrong sum."""
    rng = np.random.default_rng(p)
    for n, seg in [(0, 4), (1, 1), (p + 1, 1), (37, 3), (100, 7), (100, 1000)]:
        before = inputs(kind, n, p, seed=n)
        bufs = [b.copy() for b in before]
        plans = [ring.ring_plan(kind, n, p, r, seg) for r in range(p)]
        sent = [0] * p  # messages delivered on link r -> r+1
        send_done = [set() for _ in range(p)]
        recv_done = [set() for _ in range(p)]
        while True:
            ready = []
            for r in range(p):
                sends, recvs = plans[r][0], plans[(r + 1) % p][1]
                m = sent[r]
                if m < len(sends):
                    after_recv = sends[m][2]
                    after_send = recvs[m][3]
                    if ((after_recv < 0 or after_recv in recv_done[r])
                            and (after_send < 0 or after_send in send_done[(r + 1) % p])):
                        ready.append(r)
            if not ready:
                break
            r = ready[rng.integers(len(ready))]
            q, m = (r + 1) % p, sent[r]
            s_lo, s_hi, _ = plans[r][0][m]
            lo, hi, add, _ = plans[q][1][m]
            assert s_hi - s_lo == hi - lo, "both ends of a message agree on its length"
            data = bufs[r][s_lo:s_hi].copy()
            bufs[q][lo:hi] = bufs[q][lo:hi] + data if add else data
            send_done[r].add(m)
            recv_done[q].add(m)
            sent[r] += 1
        assert all(sent[r] == len(plans[r][0]) for r in range(p)), "a message never went"
        assert all(len(recv_done[r]) == len(plans[r][1]) for r in range(p))
        check_result(kind, before, bufs)


def test_single_rank_is_a_no_op_with_the_right_results():
    comm = MPI.COMM_SELF
    buf = np.arange(10.0)
    assert ring.all_reduce(comm, buf) is buf
    view = ring.reduce_scatter(comm, buf)
    assert np.shares_memory(view, buf) and view.size == 10
    assert ring.all_gather(comm, buf) is buf
    request = ring.iall_reduce(comm, buf)
    assert request.done and request.test() and request.wait() is buf
    np.testing.assert_array_equal(buf, np.arange(10.0))
    with pytest.raises(ValueError, match="contiguous"):
        ring.all_reduce(comm, np.zeros((4, 4))[:, 1])


def test_each_operation_gets_the_next_tag_below_tag_ub():
    """A counter per communicator (a new one starts afresh), in the upper half of the tags."""
    comms = [MPI.COMM_SELF.Dup() for _ in range(2)]
    try:
        ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)  # only COMM_WORLD is sure to carry it
        tags = [ring._next_tag(comms[0]) for _ in range(5)]
        assert tags == list(range(tags[0], tags[0] + 5)) and ub // 2 < tags[0] <= tags[-1] <= ub
        assert ring._next_tag(comms[1]) == tags[0]
    finally:
        for comm in comms:
            comm.Free()


class CommWithoutTagUb:
    """A communicator as Open MPI makes them by Split or Dup: no TAG_UB attribute."""

    def __init__(self):
        self.attrs = {}

    def Get_attr(self, keyval):
        return self.attrs.get(keyval)

    def Set_attr(self, keyval, value):
        self.attrs[keyval] = value


def test_tags_on_a_communicator_without_tag_ub_come_from_comm_world():
    ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
    tags = [ring._next_tag(CommWithoutTagUb()) for _ in range(2)]
    assert tags[0] == tags[1] and ub // 2 < tags[0] <= ub


# ---------------------------------------------------------------- under mpiexec

def lengths(p):
    return sorted({0, 1, 3, max(p - 1, 0), p, 1000, 1000003})


def segment_sizes(n, itemsize):
    """A tiny segment (many messages) only where it stays cheap, and the default."""
    return [64, ring.DEFAULT_SEGMENT_BYTES] if n * itemsize <= 1 << 16 else \
        [4096 * itemsize, ring.DEFAULT_SEGMENT_BYTES]


def local_data(n, dtype, sub, integer, salt):
    rng = np.random.default_rng([sub.Get_rank(), sub.Get_size(), n, salt])
    data = rng.integers(-1000, 1000, n) if integer else rng.standard_normal(n)
    return data.astype(dtype)


def mpi_reference(kind, sub, data):
    """What MPI's own collective gives for `data` (this rank's input)."""
    n, p, r = data.size, sub.Get_size(), sub.Get_rank()
    counts = [hi - lo for lo, hi in (ring.shard_bounds(n, p, q) for q in range(p))]
    if kind == "all_reduce":
        out = data.copy()
        sub.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out
    if kind == "reduce_scatter":
        out = np.empty(counts[r], data.dtype)
        sub.Reduce_scatter(data, out, recvcounts=counts, op=MPI.SUM)
        return out
    lo, hi = ring.shard_bounds(n, p, r)
    out = np.empty(n, data.dtype)
    displs = [sum(counts[:q]) for q in range(p)]
    sub.Allgatherv(data[lo:hi].copy(), [out, (counts, displs)])
    return out


def our_input(kind, sub, data):
    """The buffer ours starts from (all-gather: only the own block is meaningful)."""
    buf = data.copy()
    if kind == "all_gather":
        lo, hi = ring.shard_bounds(data.size, sub.Get_size(), sub.Get_rank())
        buf[:lo] = buf[hi:] = np.nan
    return buf


def check(verdict, what, kind, sub, buf, out, reference, integer):
    """Ours (`out` as returned, `buf` the buffer) against MPI's `reference`."""
    with verdict.guard(what):
        if kind == "reduce_scatter":
            lo, hi = ring.shard_bounds(buf.size, sub.Get_size(), sub.Get_rank())
            assert out.size == hi - lo and (hi == lo or np.shares_memory(out, buf[lo:hi]))
        else:
            assert out is buf
        if integer or kind == "all_gather":
            np.testing.assert_array_equal(out, reference)
        else:  # the ring adds in another order than MPI does
            rtol = 1e-5 if buf.dtype == np.float32 else 1e-12
            np.testing.assert_allclose(out, reference, rtol=rtol, atol=rtol)


def each_subcomm(world):
    """(size, sub-communicator or None) for sizes 1..world size; every rank calls Split."""
    for size in range(1, world.Get_size() + 1):
        yield size, groups_of(world, size)


BLOCKING = {"all_reduce": ring.all_reduce, "reduce_scatter": ring.reduce_scatter,
            "all_gather": ring.all_gather}


def against_mpi(verdict, what, kind, sub, data, seg, integer):
    """Our blocking `kind` of this rank's `data` over `sub`, checked against MPI's."""
    reference = mpi_reference(kind, sub, data)
    buf = our_input(kind, sub, data)
    out = BLOCKING[kind](sub, buf, seg)
    check(verdict, what, kind, sub, buf, out, reference, integer)
    return buf


@pytest.mark.mpi(min_size=2)
def test_blocking_collectives_match_mpi():
    world, verdict = MPI.COMM_WORLD, Verdict()
    for size, sub in each_subcomm(world):
        if sub is None:
            continue
        for dtype in DTYPES:
            for n in lengths(size):
                for seg in segment_sizes(n, np.dtype(dtype).itemsize):
                    for integer in (True, False):
                        for kind in KINDS:
                            what = f"{kind} p={size} n={n} {np.dtype(dtype).name} seg={seg}" \
                                   f" {'int' if integer else 'random'}"
                            data = local_data(n, dtype, sub, integer, KINDS.index(kind))
                            with verdict.guard(what):
                                against_mpi(verdict, what, kind, sub, data, seg, integer)
        sub.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_nonblocking_collectives_in_flight_together():
    """All three kinds in flight on one communicator, pushed by test() calls in a
    rank-dependent order, then waited for in reverse: each matches MPI."""
    world, verdict = MPI.COMM_WORLD, Verdict()
    start = {"all_reduce": ring.iall_reduce, "reduce_scatter": ring.ireduce_scatter,
             "all_gather": ring.iall_gather}
    for size, sub in each_subcomm(world):
        if sub is None:
            continue
        for dtype in DTYPES:
            for n, seg in [(1, 64), (size + 1, 64), (1000, 64), (100003, 4096),
                           (1000003, ring.DEFAULT_SEGMENT_BYTES)]:
                what = f"p={size} n={n} {np.dtype(dtype).name} seg={seg}"
                with verdict.guard(what):
                    cases = []
                    for kind in KINDS:
                        data = local_data(n, dtype, sub, True, 10 + KINDS.index(kind))
                        cases.append((kind, mpi_reference(kind, sub, data),
                                      our_input(kind, sub, data)))
                    requests = [start[kind](sub, buf, seg) for kind, _, buf in cases]
                    order = requests if sub.Get_rank() % 2 else requests[::-1]
                    for _ in range(5):
                        for request in order:
                            request.test()
                    outs = [request.wait() for request in requests[::-1]][::-1]
                    assert all(request.done and request.test() for request in requests)
                    for (kind, reference, buf), out in zip(cases, outs):
                        check(verdict, f"{kind} {what}", kind, sub, buf, out, reference, True)
        sub.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_many_buckets_in_flight_like_the_reducer():
    """Twenty small all-reduces started back to back (more than a window's worth of
    messages each), progressed only by test(), then waited for in order."""
    world, verdict = MPI.COMM_WORLD, Verdict()
    p = world.Get_size()
    bufs = [np.full(37 + i, world.Get_rank() + i, np.float32) for i in range(20)]
    with verdict.guard("buckets"):
        requests = [ring.iall_reduce(world, buf, 16) for buf in bufs]
        for _ in range(50):
            if all([request.test() for request in requests]):
                break
        for request in requests:
            request.wait()
        for i, buf in enumerate(bufs):
            np.testing.assert_array_equal(buf, np.full(37 + i, p * (p - 1) / 2 + p * i))
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_staged_collectives_match_mpi_and_copy_every_message_through_host_buffers():
    """The path of a GPU without CUDA-aware MPI, forced on NumPy buffers: every segment sent
    is copied out to a host slot and every segment received copied in from one."""
    from comm import backend
    world, verdict = MPI.COMM_WORLD, Verdict()
    for size, sub in each_subcomm(world):
        if sub is None:
            continue
        for n, seg in [(1, 64), (size + 1, 64), (1000, 64), (100003, 4096)]:
            for kind in KINDS:
                what = f"staged {kind} p={size} n={n} seg={seg}"
                data = local_data(n, np.float64, sub, True, KINDS.index(kind))
                with verdict.guard(what):
                    before = backend.staged_bytes[0]
                    with backend.forced_host_staging():  # MPI's reference is not ours: unstaged
                        buf = against_mpi(verdict, what, kind, sub, data, seg, True)
                    r = sub.Get_rank()
                    sent = ring.sent_elements(kind, n, size, r)
                    received = sum(np.subtract(*ring.shard_bounds(n, size, block)[::-1])
                                   for _, block, _ in ring.ring_schedule(kind, size, r))
                    staged = backend.staged_bytes[0] - before
                    assert staged == (sent + received) * buf.itemsize * (size > 1), staged
        sub.Free()
    verdict.check(world)
