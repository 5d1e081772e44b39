"""Gradient buckets for data parallelism: communication that overlaps backward.

The gradients live in one flat buffer. The reducer cuts it into contiguous buckets of at
most `bucket_bytes`, walking from the end of the buffer backwards, which is the order in
which backward finishes them (head first, embedding last). Each backward step reports the
tensors it has finished (`ready(names)`); when a bucket's last tensor is in, its ring
collective starts without blocking, and every later `ready` call pushes all collectives in
flight a little further (`test()`), so communication proceeds while backward computes.
`finish()` waits for the rest before the optimizer step.

Two modes:
- all-reduce (plain data parallelism): afterwards every rank holds the summed gradients;
- reduce-scatter (ZeRO-1): afterwards rank r holds the sum of block r of every bucket
  (`owned_ranges()`), updates only those parameters, and `gather_params` all-gathers the
  updated parameters bucket by bucket.

Compression (`compressor=`, a `comm.compress` compressor other than `none`): each bucket
is reduced by `compressor.all_reduce(comm, key=bucket index, bucket)`, which sends only
compressed payloads and leaves the sum of the ranks' decompressed gradients in every rank's
bucket. Those calls block, so they all run in `finish()`, bucket by bucket in the same order
on every rank: started from `ready` inside backward, a blocking collective could wait on a
rank that itself waits for this one's pipeline messages. With ZeRO-1 every rank then holds
the whole sum, uses its own blocks (`owned_ranges`) and all-gathers parameters as usual.
A compressor keeps per-bucket state (error feedback), so give each reducer its own.

The reducer knows flat offsets and names, nothing of models.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from comm import ring


class ReducerError(ValueError):
    """A bad reducer setting (the same on every rank)."""


@dataclass
class Bucket:
    start: int  # flat offsets [start, stop)
    stop: int
    names: list = field(default_factory=list)
    pending: int = 0
    request: object = None


class GradReducer:
    def __init__(self, comm, flat_grads, tensors: dict, bucket_bytes: int, shard=False,
                 overlap=True, segment_bytes=ring.DEFAULT_SEGMENT_BYTES, compressor=None):
        """tensors: name -> (start, stop) in `flat_grads`, covering it without gaps.
        compressor: None (or `none`) for the plain ring, else a `comm.compress` compressor."""
        if not bucket_bytes > 0:
            raise ReducerError(f"bucket size {bucket_bytes!r} bytes: expected a number > 0")
        if compressor is not None and compressor.name == "none":
            compressor = None  # the plain ring, overlapped with backward
        if compressor is not None and not isinstance(flat_grads, np.ndarray):
            raise ReducerError(f"gradient compression ({compressor.name}) works on host "
                               "(NumPy) gradients, not on the GPU: use device cpu or no "
                               "compression")
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.flat = flat_grads
        self.shard = shard
        self.overlap = overlap
        self.segment_bytes = segment_bytes
        self.compressor = compressor
        self.compressed_bytes = 0  # sent by the compressor in the last finish()
        self.buckets = _make_buckets(tensors, max(1, int(bucket_bytes) // flat_grads.itemsize),
                                     flat_grads.size)
        self.bucket_of = {name: b for b in self.buckets for name in b.names}
        self.wait_seconds = 0.0  # time finish() spent waiting: communication not hidden

    def begin_step(self):
        for bucket in self.buckets:
            bucket.pending = len(bucket.names)
            bucket.request = None

    def ready(self, names):
        """These gradients are final: launch the buckets they complete, push the others."""
        for name in names:
            bucket = self.bucket_of[name]
            bucket.pending -= 1
            if bucket.pending == 0 and self.overlap and self.compressor is None:
                self._launch(bucket)
        self.progress()

    def progress(self):
        for bucket in self.buckets:
            if bucket.request is not None and not bucket.request.done:
                bucket.request.test()

    def finish(self):
        """Launches what is left (all of it when overlap is off) and waits for everything."""
        start = time.perf_counter()
        self.compressed_bytes = 0
        for bucket in self.buckets:
            if bucket.request is None:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.request.wait()
        self.wait_seconds = time.perf_counter() - start

    def owned_ranges(self):
        """Flat (start, stop) ranges whose summed gradient this rank holds after finish()."""
        if not self.shard:
            return [(0, self.flat.size)]
        ranges = []
        for b in self.buckets:
            lo, hi = ring.shard_bounds(b.stop - b.start, self.size, self.rank)
            if hi > lo:
                ranges.append((b.start + lo, b.start + hi))
        return sorted(ranges)

    def bytes_per_step(self) -> int:
        """Bytes this rank sends per step: each bucket's reduction (and, under ZeRO-1, the
        all-gather of the updated parameters). Compressed: the bytes the compressor sent in
        the last finish(), plus that all-gather."""
        if self.compressor is not None:
            gather = sum(ring.sent_elements("all_gather", b.stop - b.start, self.size,
                                            self.rank) for b in self.buckets) if self.shard else 0
            return self.compressed_bytes + gather * self.flat.itemsize
        kinds = ("reduce_scatter", "all_gather") if self.shard else ("all_reduce",)
        return sum(ring.sent_elements(kind, b.stop - b.start, self.size, self.rank)
                   for b in self.buckets for kind in kinds) * self.flat.itemsize

    def gather_params(self, flat_params):
        """ZeRO-1: every rank's updated block of each bucket, all-gathered in place."""
        requests = [ring.iall_gather(self.comm, flat_params[b.start:b.stop], self.segment_bytes)
                    for b in self.buckets]
        for request in requests:
            request.wait()

    def _launch(self, bucket):
        view = self.flat[bucket.start:bucket.stop]
        if self.compressor is not None:  # blocking: the whole sum, also under ZeRO-1
            key = next(i for i, b in enumerate(self.buckets) if b is bucket)
            self.compressed_bytes += self.compressor.all_reduce(self.comm, key, view,
                                                                self.segment_bytes)
            bucket.request = _DONE
            return
        collective = ring.ireduce_scatter if self.shard else ring.iall_reduce
        bucket.request = collective(self.comm, view, self.segment_bytes)


class _Done:
    """The request of a bucket reduced by a blocking (compressed) collective."""

    done = True

    def test(self):
        return True

    def wait(self):
        return None


_DONE = _Done()


def _make_buckets(tensors: dict, max_elements: int, size: int):
    """Contiguous buckets from the end of the buffer backwards, each at most max_elements
    (a tensor larger than that gets a bucket of its own)."""
    ordered = sorted(tensors.items(), key=lambda item: item[1][0], reverse=True)
    buckets = []
    expected_stop = size
    for name, (start, stop) in ordered:
        if stop != expected_stop:
            raise ReducerError(f"tensor {name} ends at {stop}, expected {expected_stop}: "
                               "tensors must tile the flat buffer")
        if not buckets or buckets[-1].stop - start > max_elements:
            buckets.append(Bucket(start, stop))
        buckets[-1].start = start
        buckets[-1].names.append(name)
        expected_stop = start
    if expected_stop != 0:
        raise ReducerError(f"tensors leave [0, {expected_stop}) of the flat buffer uncovered")
    return buckets
