"""`mpiexec -n P python -m bench.comm`: our ring all-reduce (comm/ring.py) against MPICH's
`MPI.Allreduce` (in place), osu-style, float32, sizes 4 KB to 64 MB.

Both run in the same process on the same buffer, in alternating batches after a warm-up,
with a barrier before each batch, so that drift of the machine hits both alike. Each
iteration is timed on every rank; an iteration's time is the slowest rank's, and the table
shows the median over iterations. busbw = 2(p-1)/p * bytes / time (the nccl-tests
definition: the bytes each rank must move, so it is comparable across p).
"""
import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from comm import ring

SIZES = [4 << 10 << 2 * i for i in range(8)]  # 4K, 16K, ..., 64M bytes


def parse_bytes(text):
    units = {"k": 1 << 10, "m": 1 << 20}
    text = text.strip().lower().rstrip("b")
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def human(nbytes):
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def time_size(comm, nbytes, segment_bytes, window, rounds, seconds):
    """(ours median s, MPI median s) for one message size; every rank returns the same."""
    p = comm.Get_size()
    buf = np.zeros(nbytes // 4, np.float32)

    def ours():
        ring.RingRequest(comm, buf, "all_reduce", segment_bytes, window).wait()

    def mpi():
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    # Correctness once, then warm-up; zeros keep the in-place sums finite forever.
    buf[:] = comm.Get_rank() + 1
    ours()
    ok = comm.allreduce(bool(np.all(buf == p * (p + 1) / 2)), op=MPI.LAND)
    if not ok:
        raise SystemExit(f"ring all-reduce gave a wrong sum at {nbytes} bytes")
    buf[:] = 0
    start = time.perf_counter()
    for fn in (ours, mpi, ours, mpi):
        fn()
    guess = comm.allreduce((time.perf_counter() - start) / 4, op=MPI.MAX)
    iters = int(min(200, max(3, seconds / rounds / 2 / guess)))

    times = {ours: [], mpi: []}
    for _ in range(rounds):
        for fn, out in times.items():
            local = np.empty(iters)
            comm.Barrier()
            for i in range(iters):
                t0 = time.perf_counter()
                fn()
                local[i] = time.perf_counter() - t0
            comm.Allreduce(MPI.IN_PLACE, local, op=MPI.MAX)
            out.extend(local)
    return float(np.median(times[ours])), float(np.median(times[mpi]))


def memcpy_gbs(nbytes=64 << 20, reps=10):
    src, dst = np.ones(nbytes // 4, np.float32), np.zeros(nbytes // 4, np.float32)
    np.copyto(dst, src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    return nbytes / float(np.median(ts)) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segment-bytes", type=parse_bytes, default=ring.DEFAULT_SEGMENT_BYTES,
                        help="ring segment size, e.g. 65536, 256K, 1M (default %(default)s)")
    parser.add_argument("--window", type=int, default=ring.WINDOW,
                        help="segments in flight per direction (default %(default)s)")
    parser.add_argument("--sizes", type=parse_bytes, nargs="+", default=SIZES,
                        help="message sizes in bytes (default 4K ... 64M, x4)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating batches per method")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="rough time budget per size, both methods together")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    out = sys.stdout
    if rank == 0:
        cores = len(os.sched_getaffinity(0))
        note = f" (oversubscribed: {p} ranks on {cores} cores)" if p > cores else ""
        print(f"ring all-reduce vs MPI.Allreduce, float32, p={p}{note}", file=out)
        print(f"segment {human(args.segment_bytes)}B, window {args.window}; "
              f"{' '.join(MPI.Get_library_version().split()[:3])}", file=out)
        head = (f"{'bytes':>8} | {'ours us':>9} {'MPI us':>9} | {'ours GB/s':>9} "
                f"{'MPI GB/s':>9} | {'ours/MPI':>8}")
        print(head, file=out)
        print("-" * len(head), file=out)
    for nbytes in args.sizes:
        t_ours, t_mpi = time_size(comm, nbytes, args.segment_bytes, args.window,
                                  args.rounds, args.seconds)
        factor = 2 * (p - 1) / p if p > 1 else 1.0
        bw_ours, bw_mpi = factor * nbytes / t_ours / 1e9, factor * nbytes / t_mpi / 1e9
        if rank == 0:
            print(f"{human(nbytes):>8} | {t_ours * 1e6:>9.1f} {t_mpi * 1e6:>9.1f} | "
                  f"{bw_ours:>9.2f} {bw_mpi:>9.2f} | {bw_ours / bw_mpi:>7.2f}x", file=out)
    comm.Barrier()
    gbs = memcpy_gbs() if rank == 0 else 0.0  # the other ranks wait, idle, in the barrier
    comm.Barrier()
    if rank == 0:
        print(f"memcpy reference (np.copyto, 64M, one rank): {gbs:.1f} GB/s", file=out)


if __name__ == "__main__":
    main()
