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


# ----------------------------------------------------------------- bfloat16 products

def as_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("numba_kernel", [True, False], ids=["numba", "numpy"])
def test_bfloat16_bits_round_to_nearest_even(monkeypatch, numba_kernel):
    from models import kernels
    if numba_kernel and not kernels.ENABLED:
        pytest.skip("numba not installed or GPT_MPI_KERNELS=numpy")
    monkeypatch.setattr(kernels, "ENABLED", numba_kernel)
    cases = {0x3F808000: 0x3F80,  # a tie, the even neighbour below
             0x3F818000: 0x3F82,  # a tie, the even neighbour above
             0x3F808001: 0x3F81, 0x3F807FFF: 0x3F80, 0xBF808001: 0xBF81,
             0x7F7FFFFF: 0x7F80,  # the largest float32 rounds to infinity
             0x7F800000: 0x7F80, 0xFF800000: 0xFF80, 0x00000001: 0x0000}
    x = np.array(list(cases), np.uint32).view(np.float32).reshape(3, 3)
    got = gemm.bfloat16_bits(x)
    assert got.tolist() == np.array(list(cases.values()), np.uint16).reshape(3, 3).tolist()
    nan = gemm.bfloat16_bits(np.array([[np.nan, -np.nan]], np.float32))
    assert np.isnan(as_float32(nan)).all()
    y = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)[:, 3:20]
    rounded = as_float32(gemm.bfloat16_bits(y))
    assert np.all(np.abs(rounded - y) <= np.abs(y) * 2.0 ** -8)  # half an ulp: 8-bit significand


needs_bf16 = pytest.mark.skipif(gemm.bf16_unavailable() is not None,
                                reason=f"no bf16 products here: {gemm.bf16_unavailable()}")


@needs_bf16
@pytest.mark.parametrize("accumulate", [False, True])
def test_bf16_products_are_exact_products_of_rounded_operands(monkeypatch, accumulate):
    """With use_bf16 a 2-D product equals the float64 product of its bfloat16-rounded
    operands to float32 accumulation; stacked (attention) products stay float32."""
    monkeypatch.setattr(gemm, "ENABLED", True)
    monkeypatch.setattr(gemm, "_PLANS", {})
    monkeypatch.setattr(gemm, "BF16", True)
    rng = np.random.default_rng(2)
    for a, b in operand_pairs(rng, np.float32, m=40, k=33, n=24):
        start = rand(rng, (40, 24), np.float32)
        out = gemm.matmul(a, b, out=start.copy() if accumulate else None,
                          accumulate=accumulate)
        ref = as_float32(gemm.bfloat16_bits(np.ascontiguousarray(a))).astype(np.float64) @ \
            as_float32(gemm.bfloat16_bits(np.ascontiguousarray(b))).astype(np.float64)
        ref += start if accumulate else 0.0
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        assert np.abs(out - (a @ b + (start if accumulate else 0))).max() > 1e-4  # rounded
    a, b = rand(rng, (3, 8, 6), np.float32), rand(rng, (3, 6, 5), np.float32)
    np.testing.assert_allclose(gemm.matmul(a, b), a @ b, **TOL[np.float32])


def test_use_bf16_refuses_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(gemm, "ENABLED", False)
    with pytest.raises(ValueError, match="bf16 products need MKL"):
        gemm.use_bf16(True)
    assert not gemm.BF16
    gemm.use_bf16(False)  # always allowed
