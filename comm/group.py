"""A communicator as tensor-parallel layers see it: sum collectives on arrays, by axis.

`RingGroup(comm)` runs our ring collectives (`comm.ring`) with the interface that
`models.parallel` duck-types (`models.parallel.SOLO` is its one-process stand-in):

- `size`, `rank`;
- `all_reduce(x)`: sums the contiguous x over the group in place, returns x;
- `all_gather(x, axis)`: a new array, every rank's equal part concatenated along `axis`
  in rank order;
- `reduce_scatter(x, axis)`: a new array, this rank's part (x.shape[axis] // size along
  `axis`) of the sum over the group; x is left as it was;
- `bytes_sent`: the bytes this rank has sent through the group so far, exactly as the ring
  sends them; `reset_bytes()` returns the count and zeroes it.

The ring cuts a flat buffer into `shard_bounds` blocks, rank r's block r. Parts along axis
0 of a C-contiguous array are exactly those blocks when the axis divides evenly, so another
axis is moved to the front (one contiguous copy) and back. A group of one returns its input
itself, without copying or counting.
"""
from comm import ring
from comm.backend import array_module, synchronize


def ring_bytes_sent(kind: str, n: int, p: int, r: int, itemsize: int) -> int:
    """Bytes rank r sends in a ring `kind` of n elements over p ranks (`ring.sent_elements`)."""
    return ring.sent_elements(kind, n, p, r) * itemsize


class RingGroup:
    """Our ring collectives on an mpi4py communicator, with a count of the bytes sent."""

    def __init__(self, comm, segment_bytes=ring.DEFAULT_SEGMENT_BYTES):
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.segment_bytes = segment_bytes
        self.bytes_sent = 0

    def __repr__(self):
        return f"RingGroup(rank {self.rank} of {self.size}, {self.bytes_sent} bytes sent)"

    def reset_bytes(self) -> int:
        """The bytes sent since the last reset (for a per-step log line); zeroes the count."""
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent

    def all_reduce(self, x):
        """Sums the C-contiguous x over the group in place; returns x."""
        if self.size == 1:
            return x
        # the ring reads x at once: the writes that made it must be done
        synchronize(array_module(x))
        ring.all_reduce(self.comm, x, self.segment_bytes)
        self._count("all_reduce", x)
        return x

    def all_gather(self, x, axis):
        """(..., n, ...) part along `axis`, the same shape on every rank -> (..., size*n, ...)
        in rank order, a new C-contiguous array."""
        if self.size == 1:
            return x
        xp = array_module(x)
        part = xp.moveaxis(x, axis, 0)
        n = part.shape[0]
        full = xp.empty((self.size * n,) + part.shape[1:], x.dtype)
        full[self.rank * n:(self.rank + 1) * n] = part  # the ring expects its own block in place
        synchronize(xp)
        ring.all_gather(self.comm, full, self.segment_bytes)
        self._count("all_gather", full)
        return xp.ascontiguousarray(xp.moveaxis(full, 0, axis))

    def reduce_scatter(self, x, axis):
        """(..., size*n, ...) -> (..., n, ...): this rank's part along `axis` of the sum over
        the group, a new C-contiguous array; x is not changed."""
        if self.size == 1:
            return x
        xp = array_module(x)
        if x.shape[axis] % self.size:
            raise ValueError(f"reduce_scatter: axis {axis} of shape {x.shape} does not divide "
                             f"into {self.size} equal parts")
        # Always a copy: the ring sums in place and leaves the other blocks as scratch.
        full = xp.array(xp.moveaxis(x, axis, 0), order="C")
        synchronize(xp)
        mine = ring.reduce_scatter(self.comm, full, self.segment_bytes)
        self._count("reduce_scatter", full)
        part = mine.reshape((full.shape[0] // self.size,) + full.shape[1:])
        # A copy also along axis 0: a view would keep the whole scratch buffer alive.
        return xp.moveaxis(part, 0, axis).copy(order="C")

    def _count(self, kind, buf):
        self.bytes_sent += ring_bytes_sent(kind, buf.size, self.size, self.rank, buf.itemsize)
