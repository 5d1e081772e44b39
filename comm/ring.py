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
pair is one message. A rank keeps at most `WINDOW` receives and `WINDOW` sends in flight,
posted in one canonical order (step-major, then segment) that both ends of every link
share, so all messages of one operation can use a single tag: MPI never lets messages with
the same (source, tag, communicator) overtake each other. Reduce-scatter receives land in a
few segment-sized scratch slots that stay in cache and are added as they arrive, while the
next segments are in flight. The send of segment k at step t waits only for segment k of
step t-1 (its data), not for the whole step, so the steps pipeline; an in-place receive
waits until the earlier send reading the same segment has completed.

Several operations may be in flight on one communicator (the gradient reducer starts one
per bucket, in the same order on every rank): each takes the next tag from a counter
cached on the communicator (an MPI attribute), which advances identically on every rank
because collectives are called in the same order everywhere.

A non-blocking operation only moves while some MPI call runs (MPICH has no progress
thread): call `test()` now and then between other work, or `wait()`.
"""
from mpi4py import MPI

from comm.backend import array_module

DEFAULT_SEGMENT_BYTES = 256 * 1024  # by `python -m bench.comm --segment-bytes ...` (p=2, 1-64 MB)
WINDOW = 4                           # receives (and sends) in flight per operation

_KINDS = ("all_reduce", "reduce_scatter", "all_gather")
_TAG_KEYVAL = MPI.Comm.Create_keyval()  # communicator -> operations started so far


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


def _segments(lo, hi, seg):
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]


def _next_tag(comm):
    """A tag of its own for this operation; the same on every rank of `comm`."""
    count = comm.Get_attr(_TAG_KEYVAL) or 0
    comm.Set_attr(_TAG_KEYVAL, count + 1)
    ub = comm.Get_attr(MPI.TAG_UB)
    span = ub // 2  # ring tags live in the upper half of [0, TAG_UB]
    return ub - span + 1 + count % span


class RingRequest:
    """One ring collective in flight: executes `ring_schedule` segment by segment."""

    def __init__(self, comm, buf, kind, segment_bytes=DEFAULT_SEGMENT_BYTES, window=WINDOW):
        if not buf.flags.c_contiguous:
            raise ValueError("ring collectives need a contiguous buffer")
        flat = buf.reshape(-1)
        n, p, r = flat.size, comm.Get_size(), comm.Get_rank()
        self.done = False
        self._comm, self._flat, self._xp = comm, flat, array_module(flat)
        self._result = flat[slice(*shard_bounds(n, p, r))] if kind == "reduce_scatter" else buf
        self._tag = _next_tag(comm)
        self._dest, self._src = (r + 1) % p, (r - 1) % p
        self._window = window
        # The plan: sends (lo, hi, recv it waits for) and receives (lo, hi, add?, send it
        # waits for), each list in the canonical order; -1 = waits for nothing.
        seg = max(1, segment_bytes // flat.itemsize)
        self._sends, self._recvs = [], []
        last_send, last_recv = {}, {}  # (block, segment) -> latest index
        for send_block, recv_block, add in ring_schedule(kind, p, r):
            for k, (lo, hi) in enumerate(_segments(*shard_bounds(n, p, send_block), seg)):
                self._sends.append((lo, hi, last_recv.get((send_block, k), -1)))
                last_send[send_block, k] = len(self._sends) - 1
            for k, (lo, hi) in enumerate(_segments(*shard_bounds(n, p, recv_block), seg)):
                self._recvs.append((lo, hi, add, last_send.get((recv_block, k), -1)))
                last_recv[recv_block, k] = len(self._recvs) - 1
        self._send_done = bytearray(len(self._sends))
        self._recv_done = bytearray(len(self._recvs))
        self._next_send = self._next_recv = 0
        self._in_flight, self._what = [], []  # MPI requests; ("send", i) or ("recv", j, slot)
        self._sending = self._receiving = 0
        self._left = len(self._sends) + len(self._recvs)
        adds = any(add for _, _, add, _ in self._recvs)
        self._scratch = self._xp.empty((window, seg), flat.dtype) if adds else None
        self._free_slots = list(range(window))
        self.done = self._left == 0

    def _post(self):
        """Posts every receive and send whose turn has come and whose data is ready."""
        flat, comm = self._flat, self._comm
        while self._next_recv < len(self._recvs) and self._receiving < self._window:
            j = self._next_recv
            lo, hi, add, after_send = self._recvs[j]
            if after_send >= 0 and not self._send_done[after_send]:
                break
            slot = self._free_slots.pop() if add else None
            target = self._scratch[slot, :hi - lo] if add else flat[lo:hi]
            self._in_flight.append(comm.Irecv(target, self._src, self._tag))
            self._what.append(("recv", j, slot))
            self._next_recv += 1
            self._receiving += 1
        while self._next_send < len(self._sends) and self._sending < self._window:
            i = self._next_send
            lo, hi, after_recv = self._sends[i]
            if after_recv >= 0 and not self._recv_done[after_recv]:
                break
            self._in_flight.append(comm.Isend(flat[lo:hi], self._dest, self._tag))
            self._what.append(("send", i, None))
            self._next_send += 1
            self._sending += 1

    def _finish(self, indices):
        """Books completed requests (by position in `_in_flight`); adds received segments."""
        for x in indices:
            kind, i, slot = self._what[x]
            if kind == "send":
                self._send_done[i] = 1
                self._sending -= 1
            else:
                lo, hi, add, _ = self._recvs[i]
                if add:
                    part = self._flat[lo:hi]
                    self._xp.add(part, self._scratch[slot, :hi - lo], out=part)
                    self._free_slots.append(slot)
                self._recv_done[i] = 1
                self._receiving -= 1
        gone = set(indices)
        self._in_flight = [q for x, q in enumerate(self._in_flight) if x not in gone]
        self._what = [w for x, w in enumerate(self._what) if x not in gone]
        self._left -= len(gone)
        self.done = self._left == 0

    def _step(self, block):
        self._post()
        if not self._in_flight:  # cannot happen for a consistent plan; never wait on nothing
            raise RuntimeError("ring collective stalled with nothing in flight")
        wait_or_test = MPI.Request.Waitsome if block else MPI.Request.Testsome
        indices = wait_or_test(self._in_flight)
        if indices:
            self._finish(indices)
        return bool(indices)

    def test(self) -> bool:
        """Makes all the progress possible without blocking; True once complete."""
        while not self.done and self._step(block=False):
            pass
        return self.done

    def wait(self):
        """Blocks until complete; returns what the blocking form returns."""
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
