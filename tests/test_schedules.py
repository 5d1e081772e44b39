"""app/schedules.py: schedules are complete, deadlock-free under rendezvous sends, and have
the textbook bubble and memory; a broken schedule is reported, not hung."""
import pytest

from app.schedules import (Backward, Deadlock, Forward, RecvActivation, SendActivation,
                           format_schedule, gpipe, one_f_one_b, simulate)

SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}
GRID = [(p, m) for p in range(1, 9) for m in range(1, 33)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_stage_runs_every_micro_batch_once_and_nothing_deadlocks(name):
    for p, m in GRID:
        schedule = SCHEDULES[name](p, m)
        assert len(schedule) == p
        for ops in schedule:
            assert sorted(op.mb for op in ops if isinstance(op, Forward)) == list(range(m))
            assert sorted(op.mb for op in ops if isinstance(op, Backward)) == list(range(m))
        simulate(schedule)  # raises Deadlock, or on a backward before its forward


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("forward, backward", [(1.0, 1.0), (1.0, 2.0)])
def test_bubble_is_textbook_with_uniform_costs(name, forward, backward):
    for p, m in GRID:
        sim = simulate(SCHEDULES[name](p, m), {Forward: forward, Backward: backward})
        assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)
        assert sim.makespan == pytest.approx((m + p - 1) * (forward + backward))


def test_1f1b_keeps_at_most_p_micro_batches_alive_and_gpipe_keeps_m():
    for p, m in GRID:
        f1b = simulate(one_f_one_b(p, m)).peak_alive
        gp = simulate(gpipe(p, m)).peak_alive
        assert f1b[0] == min(p, m) and all(f1b[s] <= p - s for s in range(p)), (p, m, f1b)
        assert gp == [m] * p


def test_naive_1f1b_with_swapped_send_and_receive_is_a_deadlock():
    """Stage 0 sends activation 1 before taking gradient 0, as naive 1F1B would."""
    schedule = one_f_one_b(2, 2)
    ops = schedule[0]
    i = ops.index(SendActivation(1))
    ops[i - 1], ops[i] = ops[i], ops[i - 1]  # RecvGrad(0) <-> SendActivation(1)
    with pytest.raises(Deadlock, match=r"stage 0 waits at SendActivation\(1\); stage 1 "
                                       r"waits at SendGrad\(0\)"):
        simulate(schedule)


def test_a_missing_receive_is_a_deadlock():
    schedule = gpipe(3, 2)
    schedule[2].remove(RecvActivation(1))
    with pytest.raises(Deadlock, match=r"stage 1 waits at SendActivation\(1\)"):
        simulate(schedule)


def test_bad_sizes_are_rejected():
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="expected an integer >= 1"):
            one_f_one_b(bad, 4)
        with pytest.raises(ValueError, match="expected an integer >= 1"):
            gpipe(2, bad)


def test_printed_schedule_reads_as_a_timeline():
    text = format_schedule(one_f_one_b(2, 3))
    assert text.splitlines() == [
        "stage 0: Forward(0) SendActivation(0) Forward(1) RecvGrad(0) SendActivation(1) "
        "Backward(0) Forward(2) RecvGrad(1) SendActivation(2) Backward(1) RecvGrad(2) "
        "Backward(2) ReduceGrads OptimizerStep",
        "stage 1: RecvActivation(0) Forward(0) Backward(0) SendGrad(0) RecvActivation(1) "
        "Forward(1) Backward(1) SendGrad(1) RecvActivation(2) Forward(2) Backward(2) "
        "SendGrad(2) ReduceGrads OptimizerStep"]


def test_virtual_stage_neighbours_wrap_from_last_stage_to_next_chunk():
    from app.schedules import neighbour
    assert neighbour(1, 0, 4, +1) == (2, 0)
    assert neighbour(3, 0, 4, +1) == (0, 1)   # last stage, chunk 0 -> first stage, chunk 1
    assert neighbour(0, 1, 4, -1) == (3, 0)   # and gradients flow back the same way
    assert neighbour(0, 0, 4, -1) is None
