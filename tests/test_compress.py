"""comm/compress.py: the stated error bounds, top-k's count, error feedback's bookkeeping,
PowerSGD at full rank, the wire format and its byte counts, bad settings; under MPI, the
ring reduction of every method against the sum of what each rank's payload stands for."""
import math

import numpy as np
import pytest

from comm import compress
from comm.compress import COMPRESSORS, make_compressor, topk_count
from tests.mpi_util import Verdict, groups_of

DTYPES = (np.float32, np.float64)


def normal(n, dtype=np.float64, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(dtype)


def dyadic(n, seed):
    """Integers over 64 in [-2, 2): every sum of a few thousand of them is exact."""
    return np.random.default_rng(seed).integers(-128, 128, n) / 64.0


def round_trip(c, key, grad):
    """What the receiver gets: compressed, packed, unpacked, decompressed."""
    payload = c.compress(key, grad)
    return c.decompress(c.from_buffer(c.to_buffer(payload))), payload


# ---------------------------------------------------------------- bounds

def fp16_inputs():
    yield "normal", normal(5000)
    yield "normal f32", normal(5000, np.float32)
    yield "beyond fp16 range", normal(5000, scale=1e30)       # float16 overflows at 65504
    yield "beyond fp16 range f32", normal(5000, np.float32, scale=1e6)
    yield "tiny", normal(5000, scale=1e-30)                    # float16 underflows at 6e-8
    yield "subnormal", normal(1000, scale=1e-310)  # 2^-e beyond float64: scaled by ldexp
    spread = normal(5000) * 10.0 ** np.random.default_rng(1).uniform(-20, 20, 5000)
    yield "20 decades either way", spread
    yield "zeros", np.zeros(100)


@pytest.mark.parametrize("what,x", list(fp16_inputs()), ids=[w for w, _ in fp16_inputs()])
def test_fp16_round_trip_within_its_bound(what, x):
    c = make_compressor("fp16")
    y, (e, half, _) = round_trip(c, 0, x)
    assert y.dtype == x.dtype and np.all(np.isfinite(half))
    peak = np.max(np.abs(x))
    if peak > 0:
        assert peak * 2.0 ** -15 < 2.0 ** e <= peak * 2.0 ** -14
    bound = np.maximum(2.0 ** -11 * np.abs(x), 2.0 ** (e - 25))
    assert np.all(np.abs(x.astype(np.float64) - y) <= bound)
    # relative 2^-11 wherever float16 is normal
    normal_range = (np.abs(x) >= peak * 2.0 ** -28) & (x != 0)
    rel = np.abs(x - y)[normal_range] / np.abs(x)[normal_range]
    assert rel.size == 0 or rel.max() <= 2.0 ** -11
    assert np.all(np.abs(x - y) <= peak * 2.0 ** -39 + 2.0 ** -11 * np.abs(x))


def int8_inputs():
    yield "normal", normal(5000)
    yield "normal f32", normal(5000, np.float32)
    yield "huge", normal(1000, scale=1e300)
    yield "tiny", normal(1000, scale=1e-300)
    outlier = normal(1000)
    outlier[700] = 1e6  # coarsens its own block only
    yield "outlier", outlier
    yield "zero blocks", np.concatenate([np.zeros(512), normal(100)])
    yield "one short block", normal(3)


@pytest.mark.parametrize("what,x", list(int8_inputs()), ids=[w for w, _ in int8_inputs()])
def test_int8_round_trip_within_its_bound(what, x):
    c = make_compressor("int8")
    y, (n, scales, q) = round_trip(c, 0, x)
    B = compress.INT8_BLOCK
    assert y.dtype == x.dtype and n == x.size and scales.size == math.ceil(x.size / B)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    pad = np.zeros(scales.size * B)
    pad[:x.size] = np.abs(x)
    np.testing.assert_allclose(scales, pad.reshape(-1, B).max(axis=1) / 127, rtol=1e-6)
    per_element = np.repeat(scales.astype(np.float64), B)[:x.size]
    eps = np.finfo(x.dtype).eps
    # scale/2 = max|block|/254, plus the roundings of x/scale and q*scale
    assert np.all(np.abs(x.astype(np.float64) - y) <= per_element * (0.5 + 128 * eps))
    if what == "outlier":
        assert np.abs(x - y)[:512].max() < 0.02  # the other blocks keep their resolution


# ---------------------------------------------------------------- top-k

@pytest.mark.parametrize("n", [1, 7, 100, 1000, 12345])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.07, 0.01, 1e-9])
def test_topk_keeps_exactly_ceil_ratio_n_largest(n, ratio):
    c = make_compressor("topk", ratio=ratio)
    x = normal(n, seed=n)
    y, (_, idx, values) = round_trip(c, 0, x)
    k = math.ceil(round(ratio * n, 9))  # the decimal product: 0.07 * 100 is 7, not 8
    assert k == topk_count(n, ratio) and idx.size == values.size == k
    assert np.count_nonzero(y) == k and np.unique(idx).size == k
    kept = np.zeros(n, bool)
    kept[idx] = True
    assert kept.all() or np.abs(x[kept]).min() >= np.abs(x[~kept]).max()
    np.testing.assert_array_equal(y[kept], x[kept])
    np.testing.assert_array_equal(c.residual(0), np.where(kept, 0, x))


def test_topk_count_edges():
    assert topk_count(100, 0.07) == 7 and topk_count(100, 0.071) == 8
    assert topk_count(10 ** 9, 1e-12) == 1 and topk_count(0, 0.5) == 0
    assert topk_count(100_000, 0.01) == 1000 and topk_count(5, 1.0) == 5


def test_dgc_momentum_correction_follows_lin_et_al():
    """u = m u + g; v = v + u; send top k of v; zero v and u there (m = 0.5, dyadic: exact)."""
    m, n, k = 0.5, 200, 10
    c = make_compressor("topk", ratio=k / n, momentum=m)
    u, v, sent = np.zeros(n), np.zeros(n), np.zeros(n)
    for step in range(10):
        g = dyadic(n, step)
        y, (_, idx, _) = round_trip(c, "s", g)
        u = m * u + g
        v = v + u
        np.testing.assert_array_equal(y[idx], v[idx])
        np.testing.assert_array_equal(np.delete(y, idx), 0)
        v[idx] = u[idx] = 0
        sent += y
    np.testing.assert_array_equal(c.residual("s"), v)


# ---------------------------------------------------------------- error feedback

def error_feedback_cases():
    yield "topk", make_compressor("topk", ratio=0.03)
    yield "powersgd", make_compressor("powersgd", rank=2)
    yield "int8", compress.Int8Compressor(error_feedback=True)


@pytest.mark.parametrize("name", ["topk", "powersgd", "int8"])
@pytest.mark.parametrize("inputs", ["dyadic", "normal"])
def test_error_feedback_sent_plus_residual_is_the_sum_of_gradients(name, inputs):
    c = dict(error_feedback_cases())[name]
    n, T = 1000, 20
    total, sent = np.zeros(n), np.zeros(n)
    for step in range(T):
        g = dyadic(n, step) if inputs == "dyadic" else normal(n, seed=step)
        y, _ = round_trip(c, ("bucket", 3), g)  # what reached the other end
        total += g
        sent += y
    assert np.abs(c.residual(("bucket", 3))).max() > 0  # something is still held back
    if name == "topk" and inputs == "dyadic":  # every addition exact: equal to the last bit
        np.testing.assert_array_equal(sent + c.residual(("bucket", 3)), total)
    else:
        np.testing.assert_allclose(sent + c.residual(("bucket", 3)), total, rtol=0, atol=1e-12)


def test_streams_keep_their_own_state_and_length():
    c = make_compressor("topk", ratio=0.1)
    c.compress("a", normal(50))
    c.compress("b", normal(80))
    assert c.residual("a").size == 50 and c.residual("b").size == 80 and c.residual("c") is None
    with pytest.raises(ValueError, match="key 'a': gradient of 80 float64, but the key was "
                                         "first used with 50 float64"):
        c.compress("a", normal(80))
    assert make_compressor("fp16").residual("a") is None


# ---------------------------------------------------------------- PowerSGD

@pytest.mark.parametrize("n", [1, 2, 10, 99, 1000, 4097])
def test_powersgd_at_full_rank_reproduces_the_gradient(n):
    rows, cols = compress._matrix_shape(n)
    assert rows <= cols and rows * cols >= n > (rows - 1) * cols
    c = make_compressor("powersgd", rank=rows)
    for step in range(3):  # the warm-started Q stays exact
        x = normal(n, seed=step)
        y, (_, P, Q) = round_trip(c, 0, x)
        assert P.shape == (rows, rows) and Q.shape == (cols, rows)
        np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-12)
        assert np.abs(c.residual(0)).max() < 1e-12
    f32 = make_compressor("powersgd", rank=1000)  # rank above rows: clamped
    x = normal(n, np.float32)
    y, _ = round_trip(f32, 0, x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)


def test_powersgd_low_rank_payload_is_rank_r_and_orthonormal():
    c = make_compressor("powersgd", rank=3)
    x = normal(10_000)
    y, (n, P, Q) = round_trip(c, 0, x)
    rows, cols = compress._matrix_shape(n)
    np.testing.assert_allclose(P.T @ P, np.eye(3), atol=1e-12)
    padded = np.zeros(rows * cols)
    padded[:n] = y
    assert np.linalg.matrix_rank(padded.reshape(rows, cols)) <= 3
    # one power iteration from a random start still captures part of the gradient
    assert np.linalg.norm(x - y) < np.linalg.norm(x)


def test_powersgd_starts_from_the_same_q_everywhere():
    a, b = make_compressor("powersgd", rank=2), make_compressor("powersgd", rank=2)
    x = normal(500)
    np.testing.assert_array_equal(a.decompress(a.compress(0, x)), b.decompress(b.compress(7, x)))


# ---------------------------------------------------------------- wire format and bytes

@pytest.mark.parametrize("name", COMPRESSORS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 257, 70_000])  # 70 000: top-k indices over two pages
def test_buffer_round_trip(name, dtype, n):
    c = make_compressor(name, ratio=0.3)
    x = normal(n, dtype, seed=n)
    payload = c.compress(1, x)
    buf = c.to_buffer(payload)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert buf.size == c.payload_bytes(payload) == c.wire_bytes(n, dtype)
    odd = np.empty(buf.size + 3, np.uint8)  # unaligned, as a slot of a gathered buffer is
    odd[3:] = buf
    expected = c.decompress(payload)
    for received in (buf.copy(), odd[3:]):
        y = c.decompress(c.from_buffer(received))
        assert y.dtype == np.dtype(dtype) and y.shape == (n,)
        np.testing.assert_array_equal(y, expected)
    other = "topk" if name != "topk" else "int8"
    with pytest.raises(ValueError, match=f"buffer holds {name} payload, not a {other} payload"):
        make_compressor(other).from_buffer(buf)


def test_byte_formulas():
    n, s = 100_000, 4
    sizes = {name: make_compressor(name).wire_bytes(n, np.float32) for name in COMPRESSORS}
    rows, cols = compress._matrix_shape(n)
    assert sizes == {"none": 16 + s * n, "fp16": 16 + 2 * n, "int8": 16 + s * 391 + n,
                     "topk": 16 + 1000 * (s + 2) + 4 * 2,
                     "powersgd": 24 + s * 4 * (rows + cols)}
    assert sizes["none"] / sizes["topk"] >= 50  # 66x
    topk = make_compressor("topk", ratio=0.01)
    x = normal(n, np.float32)
    assert make_compressor("none").payload_bytes(x) >= 50 * topk.payload_bytes(topk.compress(0, x))
    assert 3.9 < sizes["none"] / sizes["int8"] < 4 and sizes["none"] / sizes["fp16"] > 1.99


# ---------------------------------------------------------------- bad settings

@pytest.mark.parametrize("kwargs,message", [
    ({"name": "zip"}, "unknown compressor 'zip': expected one of none, fp16, int8, topk, "
                      "powersgd"),
    ({"name": "TopK"}, "unknown compressor 'TopK': expected one of none, fp16"),
    ({"name": "topk", "ratio": 0}, r"top-k ratio 0: expected a number in \(0, 1\]"),
    ({"name": "topk", "ratio": 1.5}, r"top-k ratio 1.5: expected a number in \(0, 1\]"),
    ({"name": "topk", "ratio": -0.01}, r"top-k ratio -0.01: expected"),
    ({"name": "topk", "ratio": float("nan")}, r"top-k ratio nan: expected"),
    ({"name": "powersgd", "rank": 0}, "PowerSGD rank 0: expected an integer >= 1"),
    ({"name": "powersgd", "rank": -2}, "PowerSGD rank -2: expected an integer >= 1"),
    ({"name": "powersgd", "rank": 2.5}, "PowerSGD rank 2.5: expected an integer >= 1"),
    ({"name": "topk", "momentum": 1.0}, r"top-k momentum 1.0: expected a number in \[0, 1\)"),
])
def test_bad_settings_name_the_value_and_what_is_expected(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        make_compressor(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_gradients():
    c = make_compressor("int8")
    for bad in (np.zeros((3, 3)), np.zeros(4, np.float16), np.zeros(4, np.int64)):
        with pytest.raises(ValueError, match="expected a 1-D float32 or float64 array"):
            c.compress(0, bad)
    with pytest.raises(ValueError, match="compressors take NumPy arrays, not list"):
        c.compress(0, [1.0, 2.0])


# ---------------------------------------------------------------- the ring reduction

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.mark.parametrize("name", COMPRESSORS)
def test_one_rank_all_reduce_only_compresses(name):
    ring_c, ref = make_compressor(name, ratio=0.1), make_compressor(name, ratio=0.1)
    for step in range(2):
        x = normal(300, seed=step)
        expected = ref.decompress(ref.compress("k", x))
        assert ring_c.all_reduce(MPI.COMM_SELF, "k", x) == 0
        np.testing.assert_allclose(x, expected, rtol=1e-12)


def powersgd_reference(grads, rank, residuals, Q):
    """The module docstring's all-reduce scheme on every rank's gradient (lists over ranks);
    returns the sum and the next Q, updates `residuals`."""
    p, n = len(grads), grads[0].size
    rows, cols = compress._matrix_shape(n)
    Ms = []
    for g, e in zip(grads, residuals):
        M = np.zeros(rows * cols)
        M[:n] = g + e
        Ms.append(M.reshape(rows, cols))
    P = np.linalg.qr(sum(M @ Q for M in Ms))[0]
    Q = sum(M.T @ P for M in Ms)
    approx = (P @ Q.T).reshape(-1)[:n]
    for i, M in enumerate(Ms):
        residuals[i] = M.reshape(-1)[:n] - approx / p
    return approx, Q


@pytest.mark.mpi(min_size=2)
def test_ring_all_reduce_is_the_sum_of_decompressed_payloads():
    world, verdict = MPI.COMM_WORLD, Verdict()
    for size in (2, 4):
        if world.Get_size() < size:
            continue
        sub = groups_of(world, size)
        if sub is None:
            continue
        p, r = sub.Get_size(), sub.Get_rank()
        for name in COMPRESSORS:
            for dtype in DTYPES:
                for n in (1, 9, 257, 5000):  # 1 and 9: PowerSGD at full rank
                    what = f"{name} p={p} n={n} {np.dtype(dtype).name}"
                    settings = {"ratio": 0.05, "rank": 3}
                    ring_c, ref = make_compressor(name, **settings), \
                        make_compressor(name, **settings)
                    rows, cols = compress._matrix_shape(n)
                    Q = np.random.default_rng(compress.POWERSGD_SEED).standard_normal(
                        (cols, min(3, rows)))
                    residuals = [np.zeros(n)] * p
                    for step in range(3):  # state carried from step to step
                        g = normal(n, dtype, seed=[r, step, n])
                        buf = g.copy()
                        sent = ring_c.all_reduce(sub, ("bucket", n), buf, segment_bytes=256)
                        everyone = sub.allgather(buf)
                        grads = sub.allgather(g)
                        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else \
                            {"rtol": 1e-10, "atol": 1e-12}
                        if name == "powersgd":
                            expected, Q = powersgd_reference(grads, 3, residuals, Q)
                            verdict.close(f"{what} step {step}: residual", ring_c.residual(
                                ("bucket", n)), residuals[r], **tol)
                        else:
                            mine = ref.decompress(ref.compress(("bucket", n), g))
                            expected = np.zeros(n, dtype)
                            for d in sub.allgather(mine):
                                expected += d
                        verdict.close(f"{what} step {step}", buf, expected, **tol)
                        with verdict.guard(f"{what} step {step}: bytes, equal bits"):
                            assert sent == ring_c.all_reduce_bytes(n, dtype, p, r)
                            if name in ("fp16", "int8", "topk"):
                                assert sent == (p - 1) * ring_c.wire_bytes(n, dtype)
                            for other in everyone:
                                np.testing.assert_array_equal(other, buf)
                        if name == "none" or (name == "powersgd" and rows <= 3):
                            verdict.close(f"{what} step {step}: exact sum", buf,
                                          np.sum(grads, axis=0), **tol)
        sub.Free()
    verdict.check(world)
