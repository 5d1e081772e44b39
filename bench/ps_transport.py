"""`mpiexec -n 2 python -m bench.ps_transport`: why comm/ps.py uses point-to-point messages.

One parameter-server round trip, a worker's push of a gradient shard and its pull of the
parameter shard, two ways on the same ranks in one run:

- point-to-point with tags (what comm/ps.py does): the worker sends, the server receives,
  then the server sends the parameters back;
- one-sided RMA (`MPI.Win`, passive target): the worker puts its gradient into the
  server's window and gets the parameters from another, each under a lock. This is the
  lower bound of an RMA design: it leaves out how the server would learn that a gradient
  arrived and when to apply it (a flag polled in a third window, or a message after all).

Prints ms per round trip for 0.25, 3.2 (`baby`'s whole model) and 15 MiB of float32.
"""
import time

import numpy as np
from mpi4py import MPI

REPS = 20


def main():
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit("run with mpiexec -n 2: rank 0 serves, rank 1 works")
    rank = comm.Get_rank()
    for n in (1 << 16, 834_000, 4_000_000):
        grad, params = np.ones(n, np.float32), np.empty(n, np.float32)
        received, served = np.zeros(n, np.float32), np.ones(n, np.float32)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(REPS):
            if rank == 1:
                comm.Send(grad, 0, 1)
                comm.Recv(params, 0, 2)
            else:
                comm.Recv(received, 1, 1)
                comm.Send(served, 1, 2)
        p2p = (time.perf_counter() - start) / REPS
        grad_window = MPI.Win.Create(received if rank == 0 else None, comm=comm)
        param_window = MPI.Win.Create(served if rank == 0 else None, comm=comm)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(REPS):
            if rank == 1:
                grad_window.Lock(0)
                grad_window.Put(grad, 0)
                grad_window.Unlock(0)
                param_window.Lock(0, MPI.LOCK_SHARED)
                param_window.Get(params, 0)
                param_window.Unlock(0)
        comm.Barrier()
        rma = (time.perf_counter() - start) / REPS
        grad_window.Free()
        param_window.Free()
        if rank == 1:
            print(f"{4 * n / 2**20:6.2f} MiB: push + pull, point-to-point {p2p * 1e3:7.2f} ms; "
                  f"RMA put + get {rma * 1e3:7.2f} ms; RMA / point-to-point {rma / p2p:.2f}")


if __name__ == "__main__":
    main()
