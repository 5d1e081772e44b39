"""models/gemm.py: MKL's products against np.matmul, for every operand layout the model uses."""
import numpy as np
import pytest

from models import gemm, layers

needs_mkl = pytest.mark.skipif(gemm._MKL is None,
                               reason="MKL not loaded: not installed, or GPT_MPI_GEMM=numpy")
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def operand_pairs(rng, dtype, m=7, k=5, n=6):
    """(a, b) as plain, transposed and sliced views: every layout BLAS takes without a copy."""
    a, at = rand(rng, (m, k), dtype), rand(rng, (k, m), dtype).T
    b, bt = rand(rng, (k, n), dtype), rand(rng, (n, k), dtype).T
    wide = rand(rng, (m, k + 3), dtype)[:, 1:k + 1]  # rows longer than the matrix (lda > k)
    return [(a, b), (at, b), (a, bt), (at, bt), (wide, b), (wide, bt)]


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_2d_products_match_numpy(monkeypatch, dtype):
    monkeypatch.setattr(gemm, "ENABLED", True)
    rng = np.random.default_rng(0)
    for a, b in operand_pairs(rng, dtype):
        assert gemm._blas_args(a, b, None) is not None  # MKL really takes them
        np.testing.assert_allclose(gemm.matmul(a, b), a @ b, **TOL[dtype])
        out = np.full((a.shape[0], b.shape[1]), 0.5, dtype)
        gemm.matmul(a, b, out=out, accumulate=True)
        np.testing.assert_allclose(out, 0.5 + a @ b, **TOL[dtype])
        wide_out = np.zeros((a.shape[0], b.shape[1] + 2), dtype)
        gemm.matmul(a, b, out=wide_out[:, 1:-1])  # ldc > n; the margins stay untouched
        np.testing.assert_allclose(wide_out[:, 1:-1], a @ b, **TOL[dtype])
        assert not wide_out[:, [0, -1]].any()


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stacked_views_of_attention_match_numpy(monkeypatch, dtype):
    """The (B,H,...) views attention multiplies: key prefixes, transposed query blocks,
    and output blocks that are slices of a larger (B,H,T,D) array, accumulated into."""
    monkeypatch.setattr(gemm, "ENABLED", True)
    rng = np.random.default_rng(1)
    B, H, T, D, start, stop = 2, 3, 12, 4, 4, 8
    q, k = rand(rng, (B, H, T, D), dtype), rand(rng, (B, H, T, D), dtype)
    a, b = k[:, :, :stop], q[:, :, start:stop].transpose(0, 1, 3, 2)
    assert gemm._blas_args(a, b, None) is not None
    att = gemm.matmul(a, b)  # (B,H,stop,nq)
    np.testing.assert_allclose(att, a @ b, **TOL[dtype])
    dk = rand(rng, (B, H, T, D), dtype)
    expected = dk.copy()
    expected[:, :, :stop] += att @ q[:, :, start:stop]
    gemm.matmul(att, q[:, :, start:stop], out=dk[:, :, :stop], accumulate=True)
    np.testing.assert_allclose(dk, expected, **TOL[dtype])
    y = np.zeros((B, H, T, D), dtype)
    gemm.matmul(att.transpose(0, 1, 3, 2), k[:, :, :stop], out=y[:, :, start:stop])
    np.testing.assert_allclose(y[:, :, start:stop], att.transpose(0, 1, 3, 2) @ k[:, :, :stop],
                               **TOL[dtype])
    assert not y[:, :, :start].any() and not y[:, :, stop:].any()


@pytest.mark.parametrize("enabled", [True, False])
def test_what_blas_cannot_take_goes_to_numpy(monkeypatch, enabled):
    """Strided stacks, broadcasting, mixed dtypes, degenerate sizes: NumPy's answer."""
    monkeypatch.setattr(gemm, "ENABLED", enabled and gemm._MKL is not None)
    rng = np.random.default_rng(2)
    x = rand(rng, (4, 6, 5, 5), np.float32)
    cases = [
        (x[::2, :3], x[1::2, :3]),                 # stack axes that do not collapse
        (x, x[:, :, :, ::2]),                      # columns 2 apart
        (x[0, 0], x[0, 0, :, :1]),                 # n = 1
        (x[0, 0], x[0, 0].astype(np.float64)),     # mixed dtypes
        (x.reshape(24, 5, 5), x[0, 0]),            # one matrix broadcast over a stack
    ]
    for a, b in cases:
        assert gemm._blas_args(a, b, None) is None
        np.testing.assert_allclose(gemm.matmul(a, b), np.matmul(a, b), rtol=1e-6, atol=1e-6)
    out = np.ones((5, 5), np.float32)
    gemm.matmul(x[0, 0], x[0, 1][:, ::-1], out=out, accumulate=True)  # negative stride
    np.testing.assert_allclose(out, 1 + x[0, 0] @ x[0, 1][:, ::-1], rtol=1e-6, atol=1e-6)
    square = x[1, 1].copy()
    expected = square @ x[1, 2]
    gemm.matmul(square, x[1, 2], out=square)  # out is an operand: NumPy copies first
    np.testing.assert_allclose(square, expected, rtol=1e-6, atol=1e-6)
    frozen = np.zeros((5, 5), np.float32)
    frozen.flags.writeable = False
    assert gemm._blas_args(x[0, 0], x[0, 1], frozen) is None


@needs_mkl
def test_layers_give_the_same_numbers_either_way(monkeypatch):
    """Attention and a linear, forward and backward, with MKL and with NumPy (float64)."""
    rng = np.random.default_rng(3)
    B, T, H, D = 2, 10, 2, 4
    qkv = rand(rng, (B, T, 3 * H * D), np.float64)
    dy = rand(rng, (B, T, H * D), np.float64)
    w, bias = rand(rng, (H * D, 5), np.float64), rand(rng, (5,), np.float64)

    def run():
        y, cache = layers.attention_forward(qkv, H, query_block=4)
        dqkv, _ = layers.attention_backward(cache, dy)
        z, lcache = layers.linear_forward(w, bias, y)
        dz, grads = layers.linear_backward(lcache, z)
        return [y, dqkv, z, dz, grads["weight"], grads["bias"]]

    monkeypatch.setattr(gemm, "ENABLED", True)
    with_mkl = run()
    monkeypatch.setattr(gemm, "ENABLED", False)
    for a, b in zip(with_mkl, run()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_batch_stride_and_layout_rules():
    x = np.zeros((2, 3, 8, 4), np.float32)
    assert gemm._batch_stride(x) == 32
    assert gemm._batch_stride(x[:, :, :5]) == 32  # a row prefix keeps the stack stride
    assert gemm._batch_stride(x[:, ::2]) is None  # 2 x 2 matrices, 64 apart and 96 apart
    assert gemm._batch_stride(x[:1, :1]) == 0  # one matrix
    assert gemm._matrix_layout(x[0, 0]) == (gemm._NO_TRANS, 4)
    assert gemm._matrix_layout(x[0, 0].T) == (gemm._TRANS, 4)
    assert gemm._matrix_layout(x[0, 0, ::2]) == (gemm._NO_TRANS, 8)
    assert gemm._matrix_layout(x[0, 0, :, ::2]) is None


@needs_mkl
def test_openblas_keeps_one_thread_while_mkl_serves(monkeypatch):
    if gemm._OPENBLAS is None:
        pytest.skip("this NumPy's OpenBLAS thread count is not reachable")
    get_threads, _ = gemm._OPENBLAS
    was = gemm.ENABLED
    monkeypatch.setattr(gemm, "_OPENBLAS_THREADS", 2)
    try:
        gemm.use_mkl(True)
        assert (gemm.ENABLED, get_threads()) == (True, 1)
        gemm.use_mkl(False)
        assert (gemm.ENABLED, get_threads()) == (False, 2)
    finally:
        monkeypatch.undo()
        gemm.use_mkl(was)


@needs_mkl
def test_a_remembered_plan_serves_new_arrays_of_the_same_layout(monkeypatch):
    """The plan cache keys on shapes, strides and dtypes, never on the data's address."""
    monkeypatch.setattr(gemm, "ENABLED", True)
    monkeypatch.setattr(gemm, "_PLANS", {})
    monkeypatch.setattr(gemm, "_PLANS_MAX", 2)
    rng = np.random.default_rng(4)
    for _ in range(3):
        a, b = rand(rng, (6, 5), np.float32), rand(rng, (7, 5), np.float32).T
        np.testing.assert_allclose(gemm.matmul(a, b), a @ b, **TOL[np.float32])
        c = rand(rng, (3, 6, 5), np.float32)
        np.testing.assert_allclose(gemm.matmul(c, c.transpose(0, 2, 1)),
                                   c @ c.transpose(0, 2, 1), **TOL[np.float32])
        d = rand(rng, (5, 3), np.float32)  # a third layout: the full cache is cleared
        np.testing.assert_allclose(gemm.matmul(a, d), a @ d, **TOL[np.float32])
    assert 1 <= len(gemm._PLANS) <= 2
