"""app/parallel/layout.py: every layout rule in one module, each bad value one `error:`
line naming it, on one process and under mpiexec (every rank meets it alike and exits)."""
import re

import pytest

from app.config import make_config
from app.errors import UserError
from app.parallel.layout import plan
from app_util import FAST, app, assert_user_error

BASE = dict(n_layer=4, n_head=4, n_embd=32, block_size=16, batch_size=8)


def test_a_good_layout_on_every_axis():
    layout = plan(make_config(dict(BASE, pp=2, tp=2, micro_batches=2,
                                   sequence_parallel=True)), world=8)
    assert (layout.dp, layout.pp, layout.tp, layout.rows) == (2, 2, 2, 2)
    assert layout.ranges == ((0, 2), (2, 4)) or len(layout.ranges) == 2
    assert layout.describe().startswith("dp=2 pp=2 tp=2 micro_batches=2 schedule=1f1b")


def test_dp_defaults_to_the_ranks_that_pp_and_tp_leave():
    assert plan(make_config(dict(BASE, tp=2)), world=4).dp == 2
    assert plan(make_config(dict(BASE, tp=4)), world=4).dp == 1
    one = plan(make_config(dict(BASE, sequence_parallel=True)), world=1)
    assert not one.sequence_parallel  # nothing to split with tp = 1


@pytest.mark.parametrize("values, world, message", [
    (dict(tp=3), 3, "config n_head = 4 is not divisible by tp = 3: expected whole attention "
                    "heads on every tensor-parallel rank"),
    (dict(tp=2, sequence_parallel=True, block_size=15), 2,
     "config block_size = 15 is not divisible by tp = 2 with sequence_parallel"),
    (dict(tp=2, pp=2), 6, "world size 6 != dp*pp*tp = 1*2*2 = 4"),
    (dict(tp=2, dp=3), 4, "world size 4 != dp*pp*tp = 3*1*2 = 6"),
    (dict(tp=2, micro_batches=3), 4, "config batch_size = 8 is not divisible by dp * "
                                     "micro_batches = 2 * 3"),
    (dict(chunks=2, schedule="interleaved"), 1, "config chunks = 2 needs pp > 1"),
])
def test_bad_layouts_name_the_value(values, world, message):
    with pytest.raises(UserError, match=re.escape(message)):
        plan(make_config(dict(BASE, **values)), world)


@pytest.mark.parametrize("flags, fragment", [
    (["--tp", "4"], "config n_head = 2 is not divisible by tp = 4"),
    (["--tp", "2", "--dp", "3"], "world size 4 != dp*pp*tp = 3*1*2 = 6"),
    (["--tp", "2", "--sequence-parallel", "--block-size", "15"],
     "config block_size = 15 is not divisible by tp = 2 with sequence_parallel"),
])
def test_bad_layouts_end_every_rank_with_one_line(flags, fragment, tiny_h5, tmp_path):
    # FAST sets block_size 16; the flags given later win
    result = app("train", *FAST, "--data", tiny_h5, "--out", tmp_path / "run", *flags, n=4,
                 timeout=60)
    assert_user_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_a_fixed_straggler_sleeps_every_step_and_a_rotating_one_on_one_worker_a_step():
    from app.parallel.layout import parse_straggler, straggler_delay
    fixed, rotating = parse_straggler("2:50"), parse_straggler("any:30")
    assert fixed == (2, 0.05) and rotating == (None, 0.03)
    assert [straggler_delay(fixed, step, 2, 1, 4, 0) for step in range(3)] == [0.05] * 3
    assert straggler_delay(fixed, 0, 1, 1, 4, 0) == 0.0
    chosen = []
    for step in range(60):  # world 4, 1 server: ranks 1-3 are workers
        delays = [straggler_delay(rotating, step, rank, 1, 4, 7) for rank in range(4)]
        assert sorted(delays) == [0.0, 0.0, 0.0, 0.03] and delays[0] == 0.0, delays
        chosen.append(delays.index(0.03))
    assert set(chosen) == {1, 2, 3}
    assert straggler_delay(None, 0, 1, 1, 4, 0) == 0.0
    with pytest.raises(ValueError, match="expected RANK:DELAY_MS or any:DELAY_MS"):
        parse_straggler("some:50")
