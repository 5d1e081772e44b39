"""comm/grid.py: rank order (tp fastest, then dp, then pp) and the per-axis communicators."""
import itertools

import pytest

from comm.grid import Coords, GridError, ProcessGrid, coords_of, rank_of
from tests.mpi_util import Verdict


def test_rank_order_is_tp_fastest_then_dp_then_pp():
    dp, pp, tp = 3, 2, 2
    seen = [coords_of(r, dp, pp, tp) for r in range(dp * pp * tp)]
    assert seen[:5] == [Coords(0, 0, 0), Coords(0, 0, 1), Coords(1, 0, 0), Coords(1, 0, 1),
                        Coords(2, 0, 0)]
    assert seen[6] == Coords(dp=0, pp=1, tp=0)
    for r, c in enumerate(seen):
        assert rank_of(c, dp, pp, tp) == r
    assert len(set(seen)) == dp * pp * tp


@pytest.mark.mpi(min_size=4)
def test_axis_communicators_on_four_ranks():
    from mpi4py import MPI
    world = MPI.COMM_WORLD.Split(color=0 if MPI.COMM_WORLD.Get_rank() < 4 else 1)
    verdict = Verdict()
    if MPI.COMM_WORLD.Get_rank() < 4:
        for dp, pp, tp in ((4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)):
            with verdict.guard(f"grid {dp}x{pp}x{tp}"):
                grid = ProcessGrid(dp, pp, tp, world)
                c = grid.coords
                assert c == coords_of(world.Get_rank(), dp, pp, tp)
                assert (grid.dp_comm.Get_size(), grid.pp_comm.Get_size(),
                        grid.tp_comm.Get_size()) == (dp, pp, tp)
                assert (grid.dp_comm.Get_rank(), grid.pp_comm.Get_rank(),
                        grid.tp_comm.Get_rank()) == (c.dp, c.pp, c.tp)
                # the members of my dp communicator differ from me only in dp
                members = grid.dp_comm.allgather(grid.coords)
                assert members == [Coords(d, c.pp, c.tp) for d in range(dp)]
                grid.free()
    verdict.check(MPI.COMM_WORLD)
    world.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dp, pp, tp", [(3, 1, 1), (1, 1, 1), (2, 2, 2)])
def test_grid_that_does_not_fit_fails_on_every_rank(dp, pp, tp):
    from mpi4py import MPI
    size = MPI.COMM_WORLD.Get_size()
    if dp * pp * tp == size:
        pytest.skip("this grid fits this world")
    # every rank raises (no collective is entered first), so none is left waiting
    with pytest.raises(GridError, match=f"world size {size} != dp\\*pp\\*tp"):
        ProcessGrid(dp, pp, tp)


@pytest.mark.parametrize("bad", [0, -1])
def test_axis_sizes_must_be_positive(bad):
    for args in itertools.permutations((bad, 1, 1)):
        with pytest.raises(GridError, match="expected an integer >= 1"):
            ProcessGrid(*args, comm=object())
