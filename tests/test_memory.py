"""app/memory.py: the estimate is a true lower bound, and only impossible configs are refused."""
import tracemalloc

import numpy as np
import pytest

from app.config import make_config
from app.errors import UserError
from app.memory import available_bytes, check_fits, estimate_bytes
from app.parallel.engine import StepEngine
from models import gpt

BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=8, vocab_size=256)


@pytest.fixture(scope="module")
def kernels_loaded():
    """A step in each dtype first: the first call of a numba kernel loads (or compiles) it,
    megabytes of compiler state that tracemalloc would count as the measured step's."""
    for dtype in ("float32", "float64"):
        cfg = make_config({**BASE, "dtype": dtype})
        x = np.zeros((cfg.batch_size, cfg.block_size), np.int64)
        params = gpt.init_params(cfg.model_config(), 0, np, np.dtype(dtype))
        StepEngine(cfg.model_config(), cfg, params=params)(x, x, 1e-3)


@pytest.mark.parametrize("overrides", [{}, {"micro_batches": 2}, {"block_size": 256},
                                       {"dtype": "float64", "zero": 1},
                                       {"recompute": "full", "micro_batches": 4}])
def test_the_estimate_is_below_what_a_step_really_allocates(overrides, kernels_loaded):
    """Measured with tracemalloc (NumPy reports its allocations to it): one process, a
    training step and then a validation forward pass over the whole batch, as the trainer
    does."""
    cfg = make_config({**BASE, **overrides})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (cfg.batch_size, cfg.block_size))
    tracemalloc.start()
    try:
        params = gpt.init_params(cfg.model_config(), 0, np, np.dtype(cfg.dtype))
        step = StepEngine(cfg.model_config(), cfg, params=params, recompute=cfg.recompute)
        step(x, x, 1e-3)
        validation = gpt.forward(params, cfg.model_config(), x, x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del validation
    estimate = estimate_bytes(cfg, dp=1)
    assert 0.3 * peak < estimate <= peak, (estimate, peak)


def test_estimates_scale_as_expected():
    cfg = make_config(BASE)
    assert estimate_bytes(make_config({**BASE, "dtype": "float64"}), 1) == \
        2 * estimate_bytes(cfg, 1)
    longer = make_config({**BASE, "block_size": 1024})
    assert estimate_bytes(longer, 1) > 16 * estimate_bytes(cfg, 1)  # the T^2 of attention
    assert estimate_bytes(make_config({**BASE, "zero": 1}), 4) < estimate_bytes(cfg, 1)


def test_a_config_that_cannot_fit_is_refused_with_the_figures():
    free = available_bytes()
    if free is None:
        pytest.skip("neither /proc/meminfo nor a cgroup limit is readable here")
    huge = make_config({**BASE, "block_size": 20000, "batch_size": 12, "n_head": 4})
    with pytest.raises(UserError, match=r"config needs at least [\d.]+ GiB of memory \(4 ranks "
                                        r"here\) but [\d.]+ GiB is available"):
        check_fits(huge, dp=1, ranks_on_node=4)
    check_fits(make_config(BASE), dp=1, ranks_on_node=4)  # a small one passes
