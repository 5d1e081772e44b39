"""TrainStep on one process: gradient accumulation changes nothing, clipping uses the norm."""
import numpy as np

from app.config import TrainConfig
from app.step import TrainStep
from models import gpt

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
