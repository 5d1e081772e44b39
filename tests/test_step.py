"""The step engine without a pipeline (TrainStep) on one process: gradient accumulation
changes nothing, clipping uses the norm."""
import numpy as np
import pytest

from app.config import TrainConfig
from app.parallel.engine import TrainStep
from models import gpt
from tests.mpi_util import groups_of, Verdict

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)


def run(options, steps=3):
    params = gpt.init_params(CFG, seed=0, dtype=np.float64)
    step = TrainStep(CFG, params, options)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        x = rng.integers(0, CFG.vocab_size, (4, CFG.block_size))
        y = rng.integers(0, CFG.vocab_size, (4, CFG.block_size))
        out.append(step(x, y, 1e-2))
    return out, params.flat


def test_accumulating_micro_batches_equals_one_batch():
    for micro in (2, 4):
        got, flat = run(TrainConfig(micro_batches=micro))
        ref, ref_flat = run(TrainConfig(micro_batches=1))
        np.testing.assert_allclose(got, ref, rtol=1e-12)
        # atol: the key biases have an exactly-zero true gradient and carry only round-off
        np.testing.assert_allclose(flat, ref_flat, rtol=1e-12, atol=1e-12)


def test_step_returns_loss_and_norm_and_clips():
    (loss, norm), = run(TrainConfig(grad_clip=0.0), steps=1)[0]
    assert abs(loss - np.log(CFG.vocab_size)) < 0.1 and norm > 0
    params = gpt.init_params(CFG, seed=0, dtype=np.float64)
    step = TrainStep(CFG, params, TrainConfig(grad_clip=norm / 10))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 32, (4, 8)), rng.integers(0, 32, (4, 8))
    _, seen = step(x, y, 1e-2)
    assert seen == norm  # the norm before clipping is reported
    np.testing.assert_allclose(np.linalg.norm(step.grads.flat), norm / 10, rtol=1e-6)


def poisoned_backward(monkeypatch, when):
    """gpt.stage_backward (the step engine's one backward) whose gradients are NaN on the
    calls `when(call)` picks (through the loss's own gradient, so they are NaN before the
    reducer sends them)."""
    original, calls = gpt.stage_backward, []

    def backward(spec, cache, grads, upstream, on_ready=None):
        calls.append(None)
        return original(spec, cache, grads, np.nan if when(len(calls)) else upstream, on_ready)
    monkeypatch.setattr(gpt, "stage_backward", backward)


def test_a_non_finite_gradient_skips_the_update(monkeypatch):
    params = gpt.init_params(CFG, seed=0, dtype=np.float64)
    step = TrainStep(CFG, params, TrainConfig())
    x = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, CFG.block_size))
    step(x, x, 1e-2)
    before, t = params.flat.copy(), step.optimizer.t
    poisoned_backward(monkeypatch, lambda call: call == 1)
    loss, norm = step(x, x, 1e-2)
    assert step.skipped and np.isnan(norm) and np.isfinite(loss)
    np.testing.assert_array_equal(params.flat, before)
    assert step.optimizer.t == t
    step(x, x, 1e-2)
    assert not step.skipped and not np.array_equal(params.flat, before)


@pytest.mark.mpi(min_size=2)
def test_a_nan_gradient_on_one_rank_skips_the_step_on_every_rank(monkeypatch):
    """Rank 1 of each pair meets a NaN in its gradients: the reduced norm is NaN on every
    rank, so all skip together (ZeRO-1: nobody updates or gathers), then all go on."""
    from mpi4py import MPI
    group, verdict = groups_of(MPI.COMM_WORLD, 2), Verdict()
    params = gpt.init_params(CFG, seed=0, dtype=np.float64)
    step = TrainStep(CFG, params, TrainConfig(zero=1, bucket_mb=0.001), group)
    x = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, CFG.block_size))
    mine = x[2 * group.Get_rank():2 * group.Get_rank() + 2]
    with verdict.guard("steps"):
        step(mine, mine, 1e-2)
        before = params.flat.copy()
        poisoned_backward(monkeypatch, lambda call: call == 1 and group.Get_rank() == 1)
        step(mine, mine, 1e-2)
        assert step.skipped, "the step was not skipped"
        np.testing.assert_array_equal(params.flat, before)
        step(mine, mine, 1e-2)
        assert not step.skipped
    with verdict.guard("replicas"):
        flats = group.allgather(params.flat.tobytes())
        assert flats[0] == flats[1], "replicas differ after the skipped step"
    group.Free()
    verdict.check(MPI.COMM_WORLD)
