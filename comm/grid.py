"""The process grid: every rank's place along the data, pipeline and tensor axes.

Ranks are numbered tp fastest, then dp, then pp:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so tensor-parallel partners (which talk every layer) are neighbours and share a node, and
a pipeline stage's data-parallel replicas sit next to each other. Each axis gets its own
communicator from `Comm.Split`: `dp_comm` joins the ranks that differ only in dp_rank, and
so on.
"""
from dataclasses import dataclass


class GridError(ValueError):
    """The grid does not fit the communicator (the same on every rank, so all can exit)."""


@dataclass(frozen=True)
class Coords:
    dp: int
    pp: int
    tp: int


class ProcessGrid:
    def __init__(self, dp: int, pp: int = 1, tp: int = 1, comm=None):
        """Splits `comm` (default MPI.COMM_WORLD) into a dp x pp x tp grid.

        Raises GridError on every rank when the sizes do not multiply to comm's size."""
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
            if not isinstance(value, int) or value < 1:
                raise GridError(f"{name} = {value!r}: expected an integer >= 1")
        if dp * pp * tp != comm.Get_size():
            raise GridError(f"world size {comm.Get_size()} != dp*pp*tp = {dp}*{pp}*{tp} = "
                            f"{dp * pp * tp}: expected the ranks to fill the grid exactly")
        self.comm = comm
        self.dp, self.pp, self.tp = dp, pp, tp
        self.rank = comm.Get_rank()
        self.coords = coords_of(self.rank, dp, pp, tp)
        c = self.coords
        # Split(color, key): ranks with equal color share a communicator, ordered by key.
        self.tp_comm = comm.Split(color=c.pp * dp + c.dp, key=c.tp)
        self.dp_comm = comm.Split(color=c.pp * tp + c.tp, key=c.dp)
        self.pp_comm = comm.Split(color=c.dp * tp + c.tp, key=c.pp)

    def __repr__(self):
        c = self.coords
        return (f"ProcessGrid(dp={self.dp}, pp={self.pp}, tp={self.tp}; rank {self.rank} at "
                f"dp={c.dp}, pp={c.pp}, tp={c.tp})")

    def free(self):
        for sub in (self.tp_comm, self.dp_comm, self.pp_comm):
            sub.Free()


def coords_of(rank: int, dp: int, pp: int, tp: int) -> Coords:
    """Grid coordinates of `rank` (tp fastest, then dp, then pp)."""
    return Coords(dp=(rank // tp) % dp, pp=rank // (tp * dp), tp=rank % tp)


def rank_of(coords: Coords, dp: int, pp: int, tp: int) -> int:
    return coords.tp + tp * (coords.dp + dp * coords.pp)
