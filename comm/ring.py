"""Ring collectives (sum only) over Isend/Irecv on contiguous buffers, any length, any p.

The buffer of n elements is cut into p blocks by `shard_bounds` (like np.array_split: the
first n % p blocks one element longer; blocks may be empty). Every rank sends to r+1 and
receives from r-1.

- reduce-scatter: p-1 steps. In step s rank r sends block (r-s-1) % p and receives block
  (r-s-2) % p, which it adds into its own copy. At the end rank r holds the sum of block r.
- all-gather: p-1 steps. In step s rank r sends block (r-s) % p and receives block
  (r-s-1) % p straight into place. Rank r's own block r is the input.
- all-reduce: the reduce-scatter then the all-gather, 2(p-1) steps; each rank sends (and
  receives) 2(p-1)/p of the buffer, the bandwidth-optimal amount.

p = 3, blocks A B C (sends go to the right-hand neighbour, "A->" = sends A, "+C" = adds C):

    step            rank 0       rank 1       rank 2
    RS 0            C->  +B      A->  +C      B->  +A
    RS 1            B->  +A      C->  +B      A->  +C     now rank r holds the sum of block r
    AG 0            A->  =C      B->  =A      C->  =B
    AG 1            C->  =B      A->  =C      B->  =A     every rank holds every sum

Segments and overlap. Each block is cut into segments of `segment_bytes`; a (step, segment)
pair is one message (`ring_plan`). A rank keeps at most `WINDOW` receives and `WINDOW` sends
in flight, posted in one canonical order (step-major, then segment) that both ends of every
link share, so all messages of one operation can use a single tag: MPI never lets messages
with the same (source, tag, communicator) overtake each other. Reduce-scatter receives land
in `WINDOW` segment-sized scratch slots that stay in cache and are added as they arrive
while the next segments are in flight. The send of segment k at step t waits only for
segment k of step t-1 (its data), not for the whole step, so the steps pipeline; an in-place
receive waits until the earlier send that reads the same segment has completed.

Small buffers (up to `OUT_OF_PLACE_MAX_BYTES`) are summed into the scratch slot and copied
back instead of added in place: when the same buffer is reduced again while it is still in
cache, its lines are shared with the neighbour that read them in the last all-gather, and a
read-modify-write then pays a cross-core ownership transfer per line (a 512 KB block at
p=2: 110 us for `a += b` against 60 us for `b = a + b; a[:] = b`). Above ~1 MB in place
is faster again.

Several operations may be in flight on one communicator (the gradient reducer starts one
per bucket, in the same order on every rank): each takes the next tag from a counter
cached on the communicator (an MPI attribute), which advances identically on every rank
because collectives are called in the same order everywhere.

Progress. A non-blocking operation only moves while this rank calls `test()` or `wait()`:
MPICH has no progress thread, and each next message is posted by this code once the one it
depends on has arrived. `wait()` polls `Testsome` and calls `sched_yield` between polls
rather than using `Waitsome`, which in MPICH 5.0 spins without yielding: with more ranks
than cores (p=4 on 2) each ring step then costs a scheduler tick, 48 ms for a 1 MB ring
instead of 0.3 ms.

With CuPy buffers the adds run on the current stream, which is synchronized before a
segment they produced is sent; the caller's own writes to `buf` must be complete (synchronize)
before the collective starts.

Host staging (comm/backend.py, an MPI that cannot read device memory): each operation takes
`WINDOW` segment-sized host slots for its sends and as many for its receives, from the pool
(the same sizes every step). A send copies its segment into a free slot and posts the Isend
from there; the window keeps segment k's Isend in flight while segment k+1 is copied. A
receive lands in a slot and is copied to its place (or to the scratch slot that is added)
when it completes. The slots go back to the pool with the operation.
"""
import functools
import os

import numpy as np
from mpi4py import MPI

from comm import watchdog
from comm.backend import (array_module, copy_from_host, copy_to_host, give_back_host_buffer,
                          mpi_view, needs_staging, synchronize, take_host_buffer)

# `mpiexec -n 2 python -m bench.comm --segment-bytes S`, ours/MPI busbw at 1M 4M 16M 64M:
#   256K: 0.84 0.92 0.96 1.62   512K: 1.01 1.04 1.13 1.83   1M: 1.02 1.06 1.09 1.98
#   2M:   0.94 0.97 1.00 1.83   4M: 1.01 1.02 1.05 1.93   (one run; +-5% run to run).
# Each message costs ~10 us of Python, so small segments lose; large ones leave the cache.
DEFAULT_SEGMENT_BYTES = 1 << 20
WINDOW = 2                        # receives (and sends) in flight per operation; 4: no faster
OUT_OF_PLACE_MAX_BYTES = 1 << 20  # up to this buffer size, sum into scratch and copy back

_KINDS = ("all_reduce", "reduce_scatter", "all_gather")
_TAG_KEYVAL = MPI.Comm.Create_keyval()  # communicator -> its tag counter (`_next_tag`)


def shard_bounds(n: int, p: int, r: int) -> tuple[int, int]:
    """[lo, hi) of block r of n elements over p ranks; the first n % p blocks one longer."""
    q, extra = divmod(n, p)
    lo = r * q + min(r, extra)
    return lo, lo + q + (r < extra)


def ring_schedule(kind: str, p: int, r: int) -> list[tuple[int, int, bool]]:
    """Rank r's steps as (block sent to r+1, block received from r-1, add it?)."""
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(_KINDS)}")
    rs = [((r - s - 1) % p, (r - s - 2) % p, True) for s in range(p - 1)]
    ag = [((r - s) % p, (r - s - 1) % p, False) for s in range(p - 1)]
    return {"all_reduce": rs + ag, "reduce_scatter": rs, "all_gather": ag}[kind]


def sent_elements(kind: str, n: int, p: int, r: int) -> int:
    """Elements rank r sends in one `kind` collective of n elements (for byte accounting):
    2(p-1)/p of n for all-reduce, (p-1)/p for reduce-scatter and all-gather, give or take
    the uneven blocks."""
    if p == 1:
        return 0
    return sum(hi - lo for lo, hi in (shard_bounds(n, p, block)
                                      for block, _, _ in ring_schedule(kind, p, r)))


def _segments(lo, hi, seg):
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]


@functools.lru_cache(maxsize=256)
def ring_plan(kind: str, n: int, p: int, r: int, seg: int):
    """`ring_schedule` cut into messages of at most `seg` elements, in canonical order.

    Returns (sends, receives): sends as (lo, hi, index of the receive whose data it sends),
    receives as (lo, hi, add?, index of the earlier send that reads the same elements);
    -1 where there is nothing to wait for.
    """
    sends, recvs = [], []
    last_send, last_recv = {}, {}  # (block, segment) -> latest index
    for send_block, recv_block, add in ring_schedule(kind, p, r):
        for k, (lo, hi) in enumerate(_segments(*shard_bounds(n, p, send_block), seg)):
            sends.append((lo, hi, last_recv.get((send_block, k), -1)))
            last_send[send_block, k] = len(sends) - 1
        for k, (lo, hi) in enumerate(_segments(*shard_bounds(n, p, recv_block), seg)):
            recvs.append((lo, hi, add, last_send.get((recv_block, k), -1)))
            last_recv[recv_block, k] = len(recvs) - 1
    return tuple(sends), tuple(recvs)


def _next_tag(comm):
    """A tag of its own for this operation; the same on every rank of `comm`."""
    state = comm.Get_attr(_TAG_KEYVAL)  # [operations so far, first tag, number of tags]
    if state is None:
        # The standard attaches TAG_UB to MPI_COMM_WORLD only (Open MPI returns None on a
        # Split or Dup); the bound is the same for every communicator of the job.
        ub = comm.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        state = [0, ub - ub // 2 + 1, ub // 2]  # ring tags: the upper half of [0, TAG_UB]
        comm.Set_attr(_TAG_KEYVAL, state)
    state[0] += 1
    return state[1] + state[0] % state[2]


_scratch_pool = {}  # (array module, dtype) -> free 1-D scratch arrays, smallest first


def _take_scratch(xp, dtype, size):
    """A reused array, so that each call does not fault in fresh pages. The pool holds at
    most as many arrays as there were operations in flight at once."""
    free = _scratch_pool.setdefault((xp, dtype), [])
    if free and free[-1].size >= size:
        return free.pop()
    if free:
        free.pop()  # too small: replaced by the larger one allocated now
    return xp.empty(size, dtype)


def _give_back_scratch(xp, arr):
    free = _scratch_pool[xp, arr.dtype]
    free.append(arr)
    free.sort(key=lambda a: a.size)


class RingRequest:
    """One ring collective in flight: executes `ring_plan` message by message."""

    def __init__(self, comm, buf, kind, segment_bytes=DEFAULT_SEGMENT_BYTES, window=WINDOW):
        if kind not in _KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(_KINDS)}")
        if not buf.flags.c_contiguous:
            raise ValueError("ring collectives need a contiguous buffer")
        flat = buf.reshape(-1)
        n, p, r = flat.size, comm.Get_size(), comm.Get_rank()
        xp = array_module(flat)
        self._comm, self._flat, self._xp, self._kind = comm, flat, xp, kind
        self._result = flat[slice(*shard_bounds(n, p, r))] if kind == "reduce_scatter" else buf
        self._tag = _next_tag(comm)
        self._dest, self._src = (r + 1) % p, (r - 1) % p
        self._window = window
        seg = max(1, min(segment_bytes // flat.itemsize, -(-n // p)))  # <= the largest block
        self._sends, self._recvs = ring_plan(kind, n, p, r, seg)
        self._send_done = bytearray(len(self._sends))
        self._recv_done = bytearray(len(self._recvs))
        self._next_send = self._next_recv = 0
        self._sending = self._receiving = 0
        self._in_flight, self._what = [], []  # MPI requests; (is_send, index, slot, host slot)
        self._left = len(self._sends) + len(self._recvs)
        self._scratch = self._slots = None
        if kind != "all_gather" and self._recvs:
            self._scratch = _take_scratch(xp, flat.dtype, window * seg)
            self._slots = self._scratch[:window * seg].reshape(window, seg)
        self._free_slots = list(range(window))
        self._staging = None  # host slots (sends, receives) and their free lists
        if needs_staging(flat) and (self._sends or self._recvs):
            self._staging = [take_host_buffer(window * seg, flat.dtype) for _ in range(2)]
            self._host_slots = [b.reshape(window, seg) for b in self._staging]
            self._free_host = [list(range(window)), list(range(window))]
        self._out_of_place = flat.nbytes <= OUT_OF_PLACE_MAX_BYTES
        # CuPy adds run on a stream; a send must not read the segment before they finish.
        self._sync = (lambda: None) if xp is np else (lambda: synchronize(xp))
        self.done = False
        self._finish([])  # nothing to send (n = 0 or p = 1): done at once
        self._post()      # the first messages go out now, not at the first test()

    def _post(self):
        """Posts every receive and send whose turn has come and whose data is ready."""
        flat, comm = self._flat, self._comm
        while self._next_recv < len(self._recvs) and self._receiving < self._window:
            j = self._next_recv
            lo, hi, add, after_send = self._recvs[j]
            if after_send >= 0 and not self._send_done[after_send]:
                break
            slot = self._free_slots.pop() if add else None
            target = self._slots[slot, :hi - lo] if add else flat[lo:hi]
            host = None
            if self._staging:
                host = self._free_host[1].pop()
                target = self._host_slots[1][host, :hi - lo]
            self._in_flight.append(comm.Irecv(mpi_view(target), self._src, self._tag))
            self._what.append((False, j, slot, host))
            self._next_recv += 1
            self._receiving += 1
        while self._next_send < len(self._sends) and self._sending < self._window:
            i = self._next_send
            lo, hi, after_recv = self._sends[i]
            if after_recv >= 0 and not self._recv_done[after_recv]:
                break
            source, host = flat[lo:hi], None
            if self._staging:
                host = self._free_host[0].pop()
                source = self._host_slots[0][host, :hi - lo]
                copy_to_host(flat[lo:hi], source)
            self._in_flight.append(comm.Isend(mpi_view(source), self._dest, self._tag))
            self._what.append((True, i, None, host))
            self._next_send += 1
            self._sending += 1

    def _finish(self, indices):
        """Books completed requests (positions in `_in_flight`); adds received segments."""
        added = False
        for x in indices:
            is_send, i, slot, host = self._what[x]
            if is_send:
                self._send_done[i] = 1
                self._sending -= 1
                if host is not None:
                    self._free_host[0].append(host)
                continue
            lo, hi, add, _ = self._recvs[i]
            if host is not None:  # staged: the data is in a host slot
                copy_from_host(self._host_slots[1][host, :hi - lo],
                               self._slots[slot, :hi - lo] if add else self._flat[lo:hi])
                self._free_host[1].append(host)
            if add:
                mine, theirs = self._flat[lo:hi], self._slots[slot, :hi - lo]
                if self._out_of_place:
                    self._xp.add(mine, theirs, out=theirs)
                    mine[...] = theirs
                else:
                    self._xp.add(mine, theirs, out=mine)
                self._free_slots.append(slot)
                added = True
            self._recv_done[i] = 1
            self._receiving -= 1
        if added:
            self._sync()
        if indices:
            gone = set(indices)
            self._in_flight = [q for x, q in enumerate(self._in_flight) if x not in gone]
            self._what = [w for x, w in enumerate(self._what) if x not in gone]
            self._left -= len(gone)
        if self._left == 0:
            self.done = True
            if self._scratch is not None:
                _give_back_scratch(self._xp, self._scratch)
                self._scratch = self._slots = None
            if self._staging:
                for buf in self._staging:
                    give_back_host_buffer(buf)
                self._staging = None

    def _step(self, block):
        """Posts what it can, then waits for (or tests) the requests in flight."""
        self._post()
        if not self._in_flight:  # impossible for a consistent plan; never wait on nothing
            raise RuntimeError("ring collective stalled with nothing in flight")
        indices = MPI.Request.Testsome(self._in_flight)
        while block and not indices:  # not Waitsome: MPICH's spins without yielding (below)
            os.sched_yield()
            indices = MPI.Request.Testsome(self._in_flight)
        if indices:
            self._finish(indices)
        return bool(indices)

    def test(self) -> bool:
        """Makes all the progress possible without blocking; True once complete."""
        while not self.done and self._step(block=False):
            pass
        return self.done

    def wait(self):
        """Blocks until complete (under the watchdog); returns what the blocking form returns."""
        if not self.done:
            with watchdog.waiting(f"a ring {self._kind} of {self._flat.size} elements over "
                                  f"{self._comm.Get_size()} ranks"):
                while not self.done:
                    self._step(block=True)
        return self._result


def iall_reduce(comm, buf, segment_bytes=DEFAULT_SEGMENT_BYTES) -> RingRequest:
    """Starts an in-place sum all-reduce of `buf` over `comm`."""
    return RingRequest(comm, buf, "all_reduce", segment_bytes)


def ireduce_scatter(comm, buf, segment_bytes=DEFAULT_SEGMENT_BYTES) -> RingRequest:
    """Starts an in-place sum reduce-scatter; `wait()` returns this rank's summed block."""
    return RingRequest(comm, buf, "reduce_scatter", segment_bytes)


def iall_gather(comm, buf, segment_bytes=DEFAULT_SEGMENT_BYTES) -> RingRequest:
    """Starts an in-place all-gather of each rank's block (`shard_bounds`) of `buf`."""
    return RingRequest(comm, buf, "all_gather", segment_bytes)


def all_reduce(comm, buf, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """Sums `buf` over the ranks of `comm`, in place; returns `buf`."""
    return iall_reduce(comm, buf, segment_bytes).wait()


def reduce_scatter(comm, buf, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """In place: block `rank` of `buf` becomes the sum over ranks of that block; returns a
    view of it. The other blocks are left as scratch."""
    return ireduce_scatter(comm, buf, segment_bytes).wait()


def all_gather(comm, buf, segment_bytes=DEFAULT_SEGMENT_BYTES):
    """In place: every rank's own block of `buf` is copied to all ranks; returns `buf`."""
    return iall_gather(comm, buf, segment_bytes).wait()
