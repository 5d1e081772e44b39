"""Mixed precision (app/parallel/precision.py) on the CPU: the engine's master weights,
16-bit copies, float32 accumulation and the float16 loss scale.

The 16-bit GEMMs themselves need a GPU (`tests/test_gpu.py`); here NumPy's float16 stands in
(and float32 over float64 masters, where the comparison can be tight): the engine's logic is
the same whatever the two dtypes are.
"""
import numpy as np
import pytest

from app.config import TrainConfig
from app.errors import UserError
from app.parallel.engine import StepEngine
from app.parallel.precision import MixedPrecision, compute_dtype_of, master_dtype_of
from models import gpt
from models.optim import lr_at

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)
BATCH, SEED = 4, 3


def batch(step):
    rng = np.random.default_rng([SEED, step])
    tokens = rng.integers(0, CFG.vocab_size, (BATCH, CFG.block_size + 1))
    return tokens[:, :-1], tokens[:, 1:]


def train(steps, master=np.float64, compute=None, micro=1, **mixed_options):
    """-> (losses, skipped flags, final parameters, engine)."""
    params = gpt.init_params(CFG, SEED, np, master)
    engine = StepEngine(CFG, TrainConfig(micro_batches=micro), params=params,
                        compute_dtype=compute, mixed_options=mixed_options or None)
    losses, skipped = [], []
    for s in range(steps):
        losses.append(engine(*batch(s), lr_at(s, 3e-3, 3e-4, 1, steps))[0])
        skipped.append(engine.skipped)
    return losses, skipped, params.flat.copy(), engine


def test_float32_compute_over_float64_masters_tracks_float64():
    ref_losses, _, ref_params, _ = train(4)
    losses, _, params, engine = train(4, compute=np.float32)
    assert engine.mixed.params.flat.dtype == np.float32
    assert engine.params.flat.dtype == engine.grads.flat.dtype == np.float64
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(params, ref_params, rtol=0, atol=1e-5)


def test_micro_batches_accumulate_in_the_master_dtype():
    one, _, params_one, _ = train(3, compute=np.float32)
    two, _, params_two, engine = train(3, compute=np.float32, micro=2)
    assert engine.scratch is None  # the float32 sum is in the master gradients
    np.testing.assert_allclose(two, one, rtol=1e-6)
    np.testing.assert_allclose(params_two, params_one, rtol=0, atol=1e-6)


def test_float16_tracks_float32():
    ref, _, _, _ = train(4, master=np.float32)
    losses, skipped, _, engine = train(4, master=np.float32, compute=np.float16)
    assert engine.mixed.dynamic and not any(skipped)
    np.testing.assert_allclose(losses, ref, rtol=1e-2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_float16_overflow_skips_the_step_and_halves_the_scale():
    """A scale of 2^40 overflows float16 gradients: the engine skips those steps (parameters
    unchanged), halving the scale until gradients are finite, then trains as usual."""
    params = gpt.init_params(CFG, SEED, np, np.float32)
    engine = StepEngine(CFG, TrainConfig(), params=params, compute_dtype=np.float16,
                        mixed_options={"initial_scale": 2.0 ** 40})
    before = params.flat.copy()
    halvings = 0
    while True:
        loss, norm = engine(*batch(0), 1e-3)
        if not engine.skipped:
            break
        assert engine.overflowed and np.isfinite(loss) and not np.isfinite(norm)
        np.testing.assert_array_equal(params.flat, before)
        halvings += 1
        assert engine.mixed.scale == 2.0 ** (40 - halvings)
        assert halvings < 40
    assert halvings >= 20  # 2^40 * |gradients| is far beyond float16's 65504
    assert np.isfinite(norm) and not np.array_equal(params.flat, before)


def test_the_scale_grows_after_a_run_of_finite_steps():
    mixed = MixedPrecision(gpt.init_params(CFG, 0, np, np.float32), np.float16,
                           initial_scale=8.0, growth_interval=2)
    assert [mixed.update_scale(True) for _ in range(4)] == [False] * 4
    assert mixed.scale == 32.0
    assert mixed.update_scale(False) and mixed.scale == 16.0
    assert not MixedPrecision(mixed.master, np.float32).dynamic  # only float16 scales


def test_the_scale_cannot_fall_forever():
    mixed = MixedPrecision(gpt.init_params(CFG, 0, np, np.float32), np.float16,
                           initial_scale=2.0 ** -23)
    mixed.update_scale(False)
    with pytest.raises(UserError, match="loss scale fell below"):
        mixed.update_scale(False)


def test_config_dtypes_map_to_master_and_compute_dtypes():
    assert master_dtype_of("bf16") == master_dtype_of("fp16") == np.float32
    assert compute_dtype_of("fp16") == np.float16
    assert compute_dtype_of("float64") == master_dtype_of("float64") == np.float64
    try:
        import ml_dtypes
    except ImportError:
        with pytest.raises(UserError, match="bf16 needs the ml_dtypes package"):
            compute_dtype_of("bf16")
    else:
        assert compute_dtype_of("bf16") == ml_dtypes.bfloat16
