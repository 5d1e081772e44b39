"""Every layer's backward against float64 central differences, plus a few exact identities."""
import math

import numpy as np
import pytest

from models import kernels, layers
from tests.gradcheck import check_gradients

TOL = 1e-6
B, T, C, H, V = 2, 5, 8, 2, 11


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def check(forward, backward, inputs, rng, max_samples=40):
    check_gradients(forward, backward, inputs, rng, TOL, max_samples)


def test_linear(rng):
    x, w, b = rng.normal(size=(B, T, C)), rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C)

    def backward(cache, d):
        dx, g = layers.linear_backward(cache, d)
        return {"x": dx, "w": g["weight"], "b": g["bias"]}

    check(lambda: layers.linear_forward(w, b, x), backward, {"x": x, "w": w, "b": b}, rng)


def test_layernorm(rng):
    x = rng.normal(1.0, 2.0, size=(B, T, C))
    w, b = rng.normal(size=C), rng.normal(size=C)

    def backward(cache, d):
        dx, g = layers.layernorm_backward(cache, d)
        return {"x": dx, "w": g["weight"], "b": g["bias"]}

    check(lambda: layers.layernorm_forward(w, b, x), backward, {"x": x, "w": w, "b": b}, rng)
    y, _ = layers.layernorm_forward(np.ones(C), np.zeros(C), x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)  # eps = 1e-5 shifts it slightly


def test_gelu(rng):
    x = rng.normal(size=(B, T, 4 * C)) * 2
    check(lambda: layers.gelu_forward(x), lambda c, d: {"x": layers.gelu_backward(c, d)[0]},
          {"x": x}, rng)
    y, _ = layers.gelu_forward(np.array([0.0, 1.0, -1.0]))
    exact = [0.0, 0.8411919906082768, -0.15880800939172324]  # tanh form, from the formula
    np.testing.assert_allclose(y, exact, rtol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_linear_gelu(rng, monkeypatch, fused):
    """gelu(x W + b) as one layer, with the numba kernels and with NumPy's forms."""
    monkeypatch.setattr(kernels, "ENABLED", fused and kernels.ENABLED)
    x, w, b = rng.normal(size=(B, T, C)), rng.normal(size=(C, 4 * C)), rng.normal(size=4 * C)

    def backward(cache, d):
        dx, g = layers.linear_gelu_backward(cache, d)
        return {"x": dx, "w": g["weight"], "b": g["bias"]}

    check(lambda: layers.linear_gelu_forward(w, b, x), backward, {"x": x, "w": w, "b": b}, rng)
    y, _ = layers.linear_gelu_forward(w, b, x)
    np.testing.assert_allclose(y, layers.gelu_forward(x @ w + b)[0], rtol=1e-12, atol=1e-15)


def test_gelu_in_cache_sized_chunks_matches_formula(rng):
    """Arrays larger than one chunk are processed piecewise; the seams must not show."""
    x = rng.normal(size=(3, layers._CHUNK + 17)).astype(np.float32)
    y, slope = layers.gelu_forward(x)
    x64 = x.astype(np.float64)
    u = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)
    np.testing.assert_allclose(y, 0.5 * x64 * (1 + np.tanh(u)), rtol=2e-6, atol=1e-6)
    dx, _ = layers.gelu_backward(slope, np.ones_like(x))
    t = np.tanh(u)
    exact = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * math.sqrt(2 / math.pi) * (
        1 + 3 * 0.044715 * x64 ** 2)
    np.testing.assert_allclose(dx, exact, rtol=2e-5, atol=2e-6)


def test_attention(rng):
    qkv = rng.normal(size=(B, T, 3 * C))
    check(lambda: layers.attention_forward(qkv, H),
          lambda c, d: {"qkv": layers.attention_backward(c, d)[0]}, {"qkv": qkv}, rng, 120)


@pytest.mark.parametrize("query_block", [1, 2, 3])
def test_attention_in_query_blocks(rng, query_block):
    """Blocked attention equals one block, forward and backward, and its gradient is right."""
    qkv = rng.normal(size=(B, T, 3 * C))
    y, cache = layers.attention_forward(qkv, H, query_block=query_block)
    y_one, cache_one = layers.attention_forward(qkv, H, query_block=T)
    np.testing.assert_allclose(y, y_one, rtol=1e-12, atol=1e-14)
    dy = rng.normal(size=y.shape)
    np.testing.assert_allclose(layers.attention_backward(cache, dy)[0],
                               layers.attention_backward(cache_one, dy)[0], rtol=1e-10,
                               atol=1e-13)
    check(lambda: layers.attention_forward(qkv, H, query_block=query_block),
          lambda c, d: {"qkv": layers.attention_backward(c, d)[0]}, {"qkv": qkv}, rng, 60)


def test_attention_is_causal_and_matches_naive(rng):
    qkv = rng.normal(size=(B, T, 3 * C))
    y, _ = layers.attention_forward(qkv, H)
    D = C // H
    q, k, v = np.split(qkv, 3, axis=-1)
    for b in range(B):
        for h in range(H):
            s = slice(h * D, (h + 1) * D)
            for t in range(T):
                scores = q[b, t, s] @ k[b, :t + 1, s].T / math.sqrt(D)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                np.testing.assert_allclose(y[b, t, s], p @ v[b, :t + 1, s], rtol=1e-10)
    # the future cannot change the past
    later = qkv.copy()
    later[:, -1] += 10.0
    y2, _ = layers.attention_forward(later, H)
    np.testing.assert_array_equal(y2[:, :-1], y[:, :-1])


def test_embedding(rng):
    wte, wpe = rng.normal(size=(V, C)), rng.normal(size=(T + 3, C))
    idx = rng.integers(0, V, size=(B, T))
    idx[0, :3] = 4  # repeated ids must accumulate

    def backward(cache, d):
        _, g = layers.embedding_backward(cache, d)
        return {"wte": g["wte"], "wpe": g["wpe"]}

    check(lambda: layers.embedding_forward(wte, wpe, idx), backward, {"wte": wte, "wpe": wpe}, rng)


def test_softmax_cross_entropy(rng):
    logits = rng.normal(size=(V, B * T)) * 3  # class-major
    targets = rng.integers(0, V, size=B * T)

    def forward():
        loss, cache = layers.softmax_cross_entropy_forward(logits.copy(), targets)
        return loss, cache

    check(forward, lambda c, d: {"logits": layers.softmax_cross_entropy_backward(c, d)[0]},
          {"logits": logits}, rng, 80)
    loss, _ = forward()
    shifted = (logits - logits.max(0)).T
    expected = -np.mean(shifted[np.arange(B * T), targets] - np.log(np.exp(shifted).sum(-1)))
    assert loss == pytest.approx(expected, rel=1e-12)


def test_float32_forward_matches_float64(rng):
    x = rng.normal(size=(B, T, 3 * C))
    y64, _ = layers.attention_forward(x, H)
    y32, _ = layers.attention_forward(x.astype(np.float32), H)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
