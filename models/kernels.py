"""Fused CPU kernels compiled by numba: one pass over memory where NumPy makes several.

NumPy stays the reference: `models/layers.py` and `models/optim.py` call a kernel here
only when `enabled_for(...)` says so (numba importable, not turned off, host float arrays),
and `tests/test_kernels.py` checks every kernel against the NumPy form. Without numba the
project runs as before, slower. `GPT_MPI_KERNELS=numpy` turns the kernels off.

Why each kernel is written the way it is (measured on the 2-core AMD EPYC VM, 1 thread,
768x512 float32 = `baby`'s GELU input):
- `error_model="numpy"` on every kernel: numba's default Python error model guards each
  division with a ZeroDivisionError branch, which stops LLVM from vectorising the loop
  (a rational tanh ran 1.7 ms with it, 0.35 ms without).
- float32 GELU uses a rational tanh (the [13/6] minimax form Eigen uses; max error
  3e-7 against float64): numba's `math.tanh` is a scalar libm call, 11.6 ms here, and
  NumPy's vectorised `np.tanh` 1.5 ms. float64 keeps `math.tanh`: it serves the gradient
  checks, where exactness matters and speed does not.
- fastmath allows reassociation and contraction only: reductions vectorise, while NaN and
  infinity keep their meaning.
- Constants come from an argument in the arrays' dtype (`one = k / k`), never from an int
  literal: in numba float32 op int is float64, and that half-float64 arithmetic ran AdamW
  at half speed and GELU and LayerNorm's backward 1.2-1.3x slower (Intel Xeon, `small`).
"""
import math
import os

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload
except ImportError:  # optional: every caller falls back to its NumPy form
    numba = None

ENABLED = numba is not None and os.environ.get("GPT_MPI_KERNELS", "auto") != "numpy"

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def enabled_for(*arrays):
    """True when the fused kernels apply: numba present and on, host float32/64 arrays of
    one dtype (the kernels are typed by their inputs; CuPy arrays keep the NumPy form)."""
    if not ENABLED:
        return False
    dtype = arrays[0].dtype
    return all(type(a) is np.ndarray and a.dtype == dtype for a in arrays) and dtype in _FLOATS


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(cache=True, error_model="numpy",
                      fastmath={"reassoc", "contract", "nsz", "arcp"})(fn)


# --------------------------------------------------------------------------- GELU

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@_jit
def _tanh_rational32(u):
    """float32 tanh as a [13/6] rational function on [-9, 9] (outside, tanh is +-1 in fp32)."""
    u = np.float32(9.0) if u > np.float32(9.0) else u
    u = np.float32(-9.0) if u < np.float32(-9.0) else u
    u2 = u * u
    p = np.float32(-2.76076847742355e-16)
    p = p * u2 + np.float32(2.00018790482477e-13)
    p = p * u2 + np.float32(-8.60467152213735e-11)
    p = p * u2 + np.float32(5.12229709037114e-08)
    p = p * u2 + np.float32(1.48572235717979e-05)
    p = p * u2 + np.float32(6.37261928875436e-04)
    p = p * u2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * u2 + np.float32(1.18534705686654e-04)
    q = q * u2 + np.float32(2.26843463243900e-03)
    q = q * u2 + np.float32(4.89352518554385e-03)
    return u * p / q


def _tanh(u):
    """tanh inside kernels, typed by its argument (the overloads at the end of this file):
    float32 takes the rational form, float64 libm's."""
    return math.tanh(u)


@_jit
def _gelu(x, bias, out, slope, k, a):
    one = k / k  # constants in x's dtype (k's), none from an int: float32 math stays float32
    half, three = one / (one + one), one + one + one
    for n in range(x.shape[0]):
        row, out_row, slope_row = x[n], out[n], slope[n]
        for f in range(row.shape[0]):
            xi = row[f] + bias[f]
            t = _tanh(k * (xi + a * xi * xi * xi))
            out_row[f] = half * xi * (one + t)
            slope_row[f] = half * (one + t) + half * xi * (one - t * t) * k * (
                one + three * a * xi * xi)


def gelu(x, out, slope, bias=None):
    """(N,F) x, optional (F,) bias -> out = gelu(x + bias), slope = gelu'(x + bias), both
    written in place. The bias rides in this pass over the linear's product: a separate add
    is another pass over a (tokens, 4C) array. `out` must not be x: written in place, the
    loop ran unvectorised, 7x slower (LLVM's runtime check for overlap sends it scalar)."""
    s = x.dtype.type
    bias = np.zeros(x.shape[1], x.dtype) if bias is None else bias
    _gelu(x, bias, out, slope, s(_GELU_K), s(_GELU_A))


@_jit
def _gelu_backward(dout, slope, dx, dbias):
    N, F = dout.shape
    dbias[:] = 0
    for n in range(N):
        for f in range(F):
            d = dout[n, f] * slope[n, f]
            dx[n, f] = d
            dbias[f] += d


def gelu_backward(dout, slope, dx, dbias):
    """(N,F) dout, slope -> dx = dout * slope (N,F) and dbias = dx summed over rows (F,),
    both written in place: the bias gradient of the linear before GELU, taken in the same
    pass instead of one more over the (tokens, 4C) gradient."""
    _gelu_backward(dout, slope, dx, dbias)


# --------------------------------------------------------------------------- layer norm


@_jit
def _layernorm_forward(x, weight, bias, eps, inv_c, out, xhat, rstd):
    N, C = x.shape
    zero, one = inv_c - inv_c, inv_c / inv_c  # in x's dtype, as eps and inv_c are
    for n in range(N):
        total = zero
        for c in range(C):
            total += x[n, c]
        mean = total * inv_c
        squares = zero
        for c in range(C):
            d = x[n, c] - mean
            xhat[n, c] = d
            squares += d * d
        r = one / math.sqrt(squares * inv_c + eps)
        rstd[n] = r
        for c in range(C):
            h = xhat[n, c] * r
            xhat[n, c] = h
            out[n, c] = h * weight[c] + bias[c]


def layernorm_forward(x, weight, bias, eps, out, xhat, rstd):
    """(N,C) x -> out, xhat (N,C) and rstd (N,) written in place, one pass per row."""
    s = x.dtype.type
    _layernorm_forward(x, weight, bias, s(eps), s(1 / x.shape[1]), out, xhat, rstd)


@_jit
def _layernorm_backward(dout, xhat, rstd, weight, inv_c, dx, dweight, dbias):
    N, C = dout.shape
    zero = inv_c - inv_c  # in dout's dtype
    dweight[:] = 0
    dbias[:] = 0
    for n in range(N):
        g_sum = zero
        gx_sum = zero
        for c in range(C):
            d = dout[n, c]
            dweight[c] += d * xhat[n, c]
            dbias[c] += d
            g = d * weight[c]
            g_sum += g
            gx_sum += g * xhat[n, c]
        g_mean = g_sum * inv_c
        gx_mean = gx_sum * inv_c
        r = rstd[n]
        for c in range(C):
            dx[n, c] = r * (dout[n, c] * weight[c] - g_mean - xhat[n, c] * gx_mean)


def layernorm_backward(dout, xhat, rstd, weight, dx, dweight, dbias):
    """(N,C) dout -> dx (N,C), dweight and dbias (C,) overwritten in place."""
    _layernorm_backward(dout, xhat, rstd, weight, dout.dtype.type(1 / dout.shape[1]), dx,
                        dweight, dbias)


# --------------------------------------------------------------------------- AdamW


@_jit
def _adam(p, g, m, v, beta1, beta2, step_size, inv_sqrt_bias2, eps):
    one = beta1 / beta1  # 1 in the parameters' dtype: float32 math stays float32
    for i in range(p.size):
        gi = g[i]
        mi = beta1 * m[i] + (one - beta1) * gi
        vi = beta2 * v[i] + (one - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (math.sqrt(vi) * inv_sqrt_bias2 + eps)


def adam(p, g, m, v, beta1, beta2, step_size, inv_sqrt_bias2, eps):
    """One Adam update of flat p in place (moments m, v too): p -= step_size * m /
    (sqrt(v) * inv_sqrt_bias2 + eps), the bias corrections folded into the two scalars."""
    s = p.dtype.type
    _adam(p, g, m, v, s(beta1), s(beta2), s(step_size), s(inv_sqrt_bias2), s(eps))


# --------------------------------------------------------------------------- causal softmax

if numba is not None:
    @intrinsic
    def _bits_as_float32(typingctx, bits):
        """int32 -> float32 with the same bits: builds 2**n for the vectorisable exp."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.int32), codegen
else:
    def _bits_as_float32(bits):
        return np.int32(bits).view(np.float32)


@_jit
def _exp32(x):
    """float32 exp for x <= 0 (softmax after the max is taken out), within 2 ulp: Cephes'
    range reduction x = n ln2 + r and degree-5 polynomial, 2**n from the exponent bits.
    numba's math.exp is a scalar libm call, twice NumPy's vectorised np.exp here."""
    x = np.float32(-87.0) if x < np.float32(-87.0) else x  # 2**n stays a normal number
    # np.floor keeps float32; math.floor returns an int64, which dragged the reduction into
    # float64 and stopped LLVM from vectorising: 3.0 ns an element, against 0.8 now.
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))


def _exp(x):
    """exp inside kernels, typed like `_tanh`: float32 `_exp32`, float64 libm's."""
    return math.exp(x)


@_jit
def _causal_softmax(att, start):
    B, H, K, Q = att.shape
    top = np.empty(Q, att.dtype)
    total = np.empty(Q, att.dtype)
    for b in range(B):
        for h in range(H):
            a = att[b, h]
            top[:] = a[0]
            # Query q sees keys 0 .. start + q: key row k starts at query k - start. Loops
            # run over j from 0 with q = first + j, which LLVM vectorises; `range(first, Q)`
            # ran 3x slower, unvectorised.
            for k in range(1, K):
                row, first = a[k], max(0, k - start)
                for j in range(Q - first):
                    v = row[first + j]
                    top[first + j] = v if v > top[first + j] else top[first + j]
            total[:] = 0
            for k in range(K):
                row, first = a[k], max(0, k - start)
                row[:first] = 0
                for j in range(Q - first):
                    e = _exp(row[first + j] - top[first + j])
                    row[first + j] = e
                    total[first + j] += e
            for q in range(Q):
                total[q] = 1 / total[q]
            for k in range(K):
                row = a[k]
                for q in range(Q):
                    row[q] *= total[q]


def causal_softmax(att, start):
    """(B,H,K,Q) scores, keys on axis 2, queries start..start+Q on axis 3 -> softmax over
    the keys each query may see (k <= start + q), masked entries 0, in place."""
    _causal_softmax(att, start)


@_jit
def _softmax_backward(datt, att):
    B, H, K, Q = att.shape
    total = np.empty(Q, att.dtype)
    for b in range(B):
        for h in range(H):
            total[:] = 0
            for k in range(K):
                d, a = datt[b, h, k], att[b, h, k]
                for q in range(Q):
                    total[q] += d[q] * a[q]
            for k in range(K):
                d, a = datt[b, h, k], att[b, h, k]
                for q in range(Q):
                    d[q] = (d[q] - total[q]) * a[q]


def softmax_backward(datt, att):
    """d softmax: datt = att * (datt - sum_k datt * att), over axis 2 of (B,H,K,Q), in place."""
    _softmax_backward(datt, att)



# --------------------------------------------------------------------------- bfloat16


@_jit
def _to_bfloat16(x, out):
    for i in range(x.shape[0]):
        row, dst = x[i], out[i]
        for j in range(row.shape[0]):
            u = row[j]
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays a (quiet) NaN
                dst[j] = np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
            else:  # round to nearest, ties to even
                dst[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                                   >> np.uint32(16))


def to_bfloat16(x, out):
    """(m,n) float32 -> out (m,n) uint16: the bfloat16 bits of each element, rounded to
    nearest even (the upper half of its float32 bits), NaN kept NaN."""
    _to_bfloat16(x.view(np.uint32), out)


if numba is not None:  # float32 takes the vectorisable forms, float64 the exact libm calls
    @overload(_tanh)
    def _tanh_typed(u):
        if u == types.float32:
            return lambda u: _tanh_rational32(u)
        return lambda u: math.tanh(u)

    @overload(_exp)
    def _exp_typed(x):
        if x == types.float32:
            return lambda x: _exp32(x)
        return lambda x: math.exp(x)
