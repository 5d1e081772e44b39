"""app/schedules.py: schedules are complete, deadlock-free under rendezvous sends, and have
the textbook bubble and memory; a broken schedule is reported, not hung."""
import pytest

from app.parallel.schedules import (Backward, Deadlock, Forward, RecvActivation, RecvGrad,
                           SendActivation, format_schedule, gpipe, interleaved_1f1b, one_f_one_b,
                           simulate)

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


def test_swapped_send_and_receive_is_reported_as_a_deadlock():
    """Stage 0 waits for gradient 1 before sending activation 1, which that gradient
    needs: a cyclic wait, reported with where each stage is stuck (not hung)."""
    schedule = one_f_one_b(2, 2)
    ops = schedule[0]
    i, j = ops.index(SendActivation(1)), ops.index(RecvGrad(1))
    ops[i], ops[j] = ops[j], ops[i]
    with pytest.raises(Deadlock, match=r"stage 0 waits at RecvGrad\(1\); stage 1 waits at "
                                       r"RecvActivation\(1\)"):
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
        "stage 0: Forward(0) SendActivation(0) Forward(1) SendActivation(1) RecvGrad(0) "
        "Backward(0) Forward(2) SendActivation(2) RecvGrad(1) Backward(1) RecvGrad(2) "
        "Backward(2) ReduceGrads OptimizerStep",
        "stage 1: RecvActivation(0) Forward(0) Backward(0) SendGrad(0) RecvActivation(1) "
        "Forward(1) Backward(1) SendGrad(1) RecvActivation(2) Forward(2) Backward(2) "
        "SendGrad(2) ReduceGrads OptimizerStep"]
    assert "Forward(1/1)" in format_schedule(interleaved_1f1b(2, 2, 2))  # mb 1, chunk 1


INTERLEAVED = [(p, m, v) for p in range(1, 9) for m in range(p, 33, p) for v in (2, 3, 4)]


def test_interleaved_runs_every_unit_once_without_deadlock_and_with_the_textbook_bubble():
    """Each chunk costs 1/v of a stage; the bubble is (p-1)/(v*m+p-1) exactly."""
    for p, m, v in INTERLEAVED:
        schedule = interleaved_1f1b(p, m, v)
        for ops in schedule:
            units = [(op.mb, op.chunk) for op in ops if isinstance(op, Forward)]
            assert sorted(units) == [(mb, c) for mb in range(m) for c in range(v)]
        sim = simulate(schedule, {Forward: 1.0 / v, Backward: 2.0 / v})
        assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


def test_interleaving_cuts_the_bubble_by_about_the_number_of_chunks():
    for p in (2, 4, 8):
        m = 4 * p
        plain = simulate(one_f_one_b(p, m), {Forward: 1.0, Backward: 2.0}).bubble_fraction
        for v in (2, 3, 4):
            sim = simulate(interleaved_1f1b(p, m, v), {Forward: 1.0 / v, Backward: 2.0 / v})
            assert 0.8 * v <= plain / sim.bubble_fraction <= v, (p, v)


def test_interleaving_checks_its_arguments():
    with pytest.raises(ValueError, match="n_micro = 6: interleaving needs a multiple of "
                                         "n_stages = 4"):
        interleaved_1f1b(4, 6, 2)
    with pytest.raises(ValueError, match="n_chunks = 0: expected an integer >= 1"):
        interleaved_1f1b(4, 8, 0)
    assert interleaved_1f1b(3, 5, 1) == one_f_one_b(3, 5)


def test_per_stage_costs_make_the_slowest_stage_the_bottleneck():
    sim = simulate(one_f_one_b(3, 6), {Forward: [1.0, 2.0, 1.0], Backward: [2.0, 4.0, 2.0]})
    assert sim.makespan >= 6 * (2.0 + 4.0)  # the slow middle stage sets the pace
    assert sim.busy == [18.0, 36.0, 18.0]
