"""The CuPy path: the same model code on a GPU gives the numbers NumPy gives.

Skipped, with the reason, where there is no cupy or no CUDA device.
"""
import numpy as np
import pytest

from comm.backend import gpu_available, to_host
from models import gpt
from models.optim import AdamW, decay_mask
from tests.gradcheck import max_relative_error, numerical_grad, sample_indices

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="no cupy or no CUDA device here")]

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)


def setup_model(xp, dtype=np.float64):
    rng = np.random.default_rng(1)
    params = gpt.init_params(CFG, seed=0, xp=xp, dtype=dtype)
    params.flat += xp.asarray(rng.normal(0.0, 0.2, params.size), dtype=dtype)
    idx = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    tgt = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    return params, xp.asarray(idx), xp.asarray(tgt)


def test_gpu_gradients_match_finite_differences():
    import cupy
    params, idx, tgt = setup_model(cupy)
    _, cache = gpt.forward(params, CFG, idx, tgt)
    grads = gpt.backward(cache, params.like())
    rng = np.random.default_rng(2)
    for name in params:
        host = to_host(params[name]).copy()
        sample = sample_indices(host.shape, 6, rng)

        def loss():
            params[name][...] = cupy.asarray(host)
            return float(gpt.forward(params, CFG, idx, tgt)[0])

        numeric = numerical_grad(loss, host, sample, eps=1e-3)
        params[name][...] = cupy.asarray(host)
        error = max_relative_error(to_host(grads[name]).reshape(-1)[sample], numeric)
        assert error < 1e-6, f"{name}: {error:.2e}"


def test_gpu_training_step_matches_cpu():
    import cupy
    results = []
    for xp in (np, cupy):
        params, idx, tgt = setup_model(xp)
        grads = params.like()
        opt = AdamW(params.flat, decay_mask(params, gpt.is_decayed, xp))
        losses = []
        for _ in range(3):
            loss, cache = gpt.forward(params, CFG, idx, tgt)
            gpt.backward(cache, grads)
            opt.step(grads.flat, 1e-2)
            losses.append(float(loss))
        results.append((losses, to_host(params.flat)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-10)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-9, atol=1e-12)
