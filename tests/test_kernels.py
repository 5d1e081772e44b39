"""The fused numba kernels (models/kernels.py) against the NumPy reference they replace."""
import numpy as np
import pytest

from models import kernels, layers
from models.optim import AdamW

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")

# float32: the rational tanh is within 3e-7 of tanh; float64 kernels are exact up to order.
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
DTYPES = (np.float32, np.float64)


def both_ways(monkeypatch, fn):
    """fn() with the fused kernels, then with the NumPy form."""
    monkeypatch.setattr(kernels, "ENABLED", True)
    fused = fn()
    monkeypatch.setattr(kernels, "ENABLED", False)
    return fused, fn()


def assert_close(fused, reference, dtype):
    for a, b in zip(fused, reference):
        np.testing.assert_allclose(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_numpy(monkeypatch, dtype):
    x = (np.random.default_rng(0).standard_normal((6, 70, 33)) * 4).astype(dtype)
    x.flat[:4] = [0.0, 30.0, -30.0, 1e-3]  # zero, both saturated ends, tiny

    def run():
        return layers.gelu_forward(x)  # (gelu(x), gelu'(x)): backward multiplies by the slope

    fused, reference = both_ways(monkeypatch, run)
    assert all(a.dtype == dtype for a in fused)
    if dtype is np.float64:
        assert_close(fused, reference, dtype)
        return
    # float32: the slope's two terms nearly cancel for large |x|, so NumPy's own float32
    # result is off there too. Hold the kernel to NumPy's error against float64 instead,
    # or to 5e-6: the rational tanh's 3e-7 error is scaled by up to ~9 in the slope's
    # x (1 - t^2) k (1 + 3a x^2) term near |x| = 5.
    x = x.astype(np.float64)
    monkeypatch.setattr(kernels, "ENABLED", False)
    exact = run()
    for a, b, e in zip(fused, reference, exact):
        assert np.abs(a - e).max() <= max(2 * np.abs(b - e).max(), 5e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_matches_numpy(monkeypatch, dtype):
    """The bias inside GELU's pass, and GELU's slope with the bias gradient in backward."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 7, 16)).astype(dtype)
    w = (rng.standard_normal((16, 40)) * 0.4).astype(dtype)
    b = rng.standard_normal(40).astype(dtype)
    dout = rng.standard_normal((3, 7, 40)).astype(dtype)

    def run():
        y, cache = layers.linear_gelu_forward(w, b, x)
        grads = {"weight": np.full_like(w, 7.0), "bias": np.full(40, 7.0, dtype)}  # overwritten
        dx, _ = layers.linear_gelu_backward(cache, dout, grads)
        return y, dx, grads["weight"], grads["bias"]

    fused, reference = both_ways(monkeypatch, run)
    assert [a.shape for a in fused] == [(3, 7, 40), x.shape, w.shape, b.shape]
    # float32: the slope's error (up to 5e-6, test_gelu_matches_numpy) adds up over 21 rows
    tol = TOL[dtype] if dtype is np.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, r in zip(fused, reference):
        np.testing.assert_allclose(a, r, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_matches_numpy(monkeypatch, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 5, 48)) * 3 + 2).astype(dtype)
    w = rng.standard_normal(48).astype(dtype)
    b = rng.standard_normal(48).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)

    def run():
        out, cache = layers.layernorm_forward(w, b, x)
        grads = {"weight": np.full(48, 7.0, dtype), "bias": np.full(48, 7.0, dtype)}  # overwritten
        dx, _ = layers.layernorm_backward(cache, dout, grads)
        return out, dx, grads["weight"], grads["bias"], cache[0], cache[1]

    fused, reference = both_ways(monkeypatch, run)
    assert fused[0].shape == x.shape and fused[5].shape == (15, 1)
    assert_close(fused, reference, dtype)


def test_layernorm_kernel_takes_strided_input(monkeypatch):
    """A non-contiguous view (a slice of the sequence) goes through the kernel too."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 10, 16)).astype(np.float32)[:, ::2]
    w, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    fused, reference = both_ways(monkeypatch, lambda: layers.layernorm_forward(w, b, x)[:1])
    assert_close(fused, reference, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_matches_numpy(monkeypatch, dtype):
    rng = np.random.default_rng(3)
    n = 100_003  # several chunks and a ragged tail
    start = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(3)]
    mask = (rng.random(n) < 0.7).astype(dtype)

    def run():
        params = start.copy()
        opt = AdamW(params, mask, weight_decay=0.1, ranges=[(5, 60_000), (70_000, n)],
                    lr_scales=[(80_000, 90_000, 10.0)])
        for g in grads:
            opt.step(g, 1e-2)
        return params, opt.m, opt.v

    fused, reference = both_ways(monkeypatch, run)
    assert_close(fused, reference, dtype)


def test_kernels_refuse_what_they_do_not_handle():
    x32, x64 = np.zeros(4, np.float32), np.zeros(4, np.float64)
    assert not kernels.enabled_for(x32, x64)  # mixed dtypes
    assert not kernels.enabled_for(np.zeros(4, np.int64))
    assert not kernels.enabled_for(np.zeros(4, np.float16))


def test_environment_switch_turns_kernels_off(tmp_path):
    import subprocess
    import sys
    code = "from models import kernels; print(kernels.ENABLED)"
    env = {"GPT_MPI_KERNELS": "numpy", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, block", [(16, 64), (40, 16), (64, 64), (70, 32)])
def test_attention_matches_numpy(monkeypatch, dtype, T, block):
    """The fused causal softmax and its backward, inside attention, in one block and many
    (blocks past the first see keys beyond their own queries), ragged last block too."""
    rng = np.random.default_rng(4)
    qkv = (rng.standard_normal((2, T, 3 * 24)) * 2).astype(dtype)
    dout = rng.standard_normal((2, T, 24)).astype(dtype)

    def run():
        y, cache = layers.attention_forward(qkv, 3, query_block=block)
        return y, layers.attention_backward(cache, dout)[0]

    fused, reference = both_ways(monkeypatch, run)
    assert_close(fused, reference, dtype)


def test_softmax_survives_large_scores(monkeypatch):
    """Scores far apart (a saturated softmax) give exact zeros and ones, no NaN."""
    qkv = np.zeros((1, 8, 3 * 4), np.float32)
    qkv[0, :, :4] = 60.0  # q
    qkv[0, :, 4:8] = np.arange(8)[:, None] * 30.0  # k: later keys score far higher
    fused, reference = both_ways(monkeypatch, lambda: layers.attention_forward(qkv, 1)[:1])
    assert np.isfinite(fused[0]).all()
    assert_close(fused, reference, np.float32)
