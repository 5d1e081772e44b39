"""The GPT's layers as forward/backward pairs, llm.c style: no autograd engine.

Every `*_forward(...) -> (out, cache)` has a `*_backward(cache, d_out) -> (d_in, grads)`.
Shapes use B batch, T time, C channels, H heads, D = C // H head size, V vocab.

Backward functions take an optional `grads` mapping of preallocated arrays (views of the
model's one flat gradient buffer) and accumulate into them with `+=` semantics where a
weight is shared (the tied embedding), or overwrite them otherwise. That keeps the hot path
free of gradient copies; without `grads` they allocate and return fresh arrays.

The array module is taken from the inputs (`xp = array_module(x)`), so the same code runs
on NumPy and CuPy.
"""
import math

import numpy as np

from comm.backend import array_module
from models import gemm, gpu_kernels, kernels

# Marks a cache built by a fused GPU kernel (models/gpu_kernels.py): its backward is too.
FUSED_GPU = "fused-gpu"


def add_into(a, b):
    """a += b in place (a residual, or a bias broadcast over rows) -> a."""
    if not gpu_kernels.add_into(a, b):
        a += b
    return a


# --------------------------------------------------------------------------- embedding


def embedding_forward(wte, wpe, idx):
    """(V,C), (Tmax,C), (B,T) int -> (B,T,C): token plus position embedding."""
    T = idx.shape[1]
    out = wte[idx]
    out += wpe[:T]
    return out, (idx, wte.shape, wpe.shape)


def embedding_backward(cache, dout, grads=None):
    """dout (B,T,C) -> grads {wte: (V,C) accumulated, wpe: (Tmax,C)}; no d_in (ids)."""
    idx, wte_shape, wpe_shape = cache
    xp = array_module(dout)
    B, T, C = dout.shape
    if grads is None:
        grads = {"wte": xp.zeros(wte_shape, dout.dtype), "wpe": xp.zeros(wpe_shape, dout.dtype)}
    dwte, dwpe = grads["wte"], grads["wpe"]
    _scatter_add(xp, dwte, idx.reshape(-1), dout.reshape(B * T, C))
    dwpe[T:] = 0
    dout.sum(axis=0, out=dwpe[:T])
    return None, grads


def _scatter_add(xp, target, rows, values):
    """target[rows[i]] += values[i], repeated rows accumulating."""
    if xp is not np:
        if target.dtype.itemsize < 4:  # 16-bit sums of many repeated tokens lose too much
            wide = target.astype(np.float32)
            xp.add.at(wide, rows, values.astype(np.float32))
            target[...] = wide
        else:
            xp.add.at(target, rows, values)
        return
    # Sort, then sum each run of equal ids: 2-3x faster than the unbuffered np.add.at.
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_rows[1:] != sorted_rows[:-1])))
    target[sorted_rows[starts]] += np.add.reduceat(values[order], starts, axis=0)


# --------------------------------------------------------------------------- layer norm


def layernorm_forward(weight, bias, x, eps=1e-5):
    """(C,), (C,), (...,C) -> (...,C), normalised over the last axis."""
    xp = array_module(x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if gpu_kernels.enabled_for(x2, weight, bias):
        out, mean, rstd = gpu_kernels.layernorm_forward(weight, bias, x2, eps)
        return out.reshape(x.shape), (FUSED_GPU, x2, weight, mean, rstd)
    if kernels.enabled_for(x2, weight, bias):
        x2 = np.ascontiguousarray(x2)
        out, xhat, rstd = np.empty_like(x2), np.empty_like(x2), np.empty(len(x2), x.dtype)
        kernels.layernorm_forward(x2, weight, bias, eps, out, xhat, rstd)
        return out.reshape(x.shape), (xhat, rstd[:, None], weight)
    inv_c = _filled(xp, C, 1.0 / C, x.dtype)
    # Row means as GEMVs: several times faster than reducing along the last axis.
    xhat = x2 - (x2 @ inv_c)[:, None]
    var = (xhat * xhat) @ inv_c
    var += eps
    rstd = xp.sqrt(var, out=var)
    xp.reciprocal(rstd, out=rstd)
    rstd = rstd[:, None]
    xhat *= rstd
    out = xhat * weight
    out += bias
    return out.reshape(x.shape), (xhat, rstd, weight)


def layernorm_backward(cache, dout, grads=None):
    """dout (...,C) -> dx (...,C), {weight, bias}: (C,)."""
    xp = array_module(dout)
    if cache[0] is FUSED_GPU:
        _, x2, weight, mean, rstd = cache
        C = x2.shape[1]
        if grads is None:
            grads = {"weight": xp.empty(C, dout.dtype), "bias": xp.empty(C, dout.dtype)}
        dx = gpu_kernels.layernorm_backward(x2, weight, mean, rstd,
                                            xp.ascontiguousarray(dout.reshape(-1, C)),
                                            grads["weight"], grads["bias"])
        return dx.reshape(dout.shape), grads
    xhat, rstd, weight = cache
    N, C = xhat.shape
    d2 = dout.reshape(N, C)
    if grads is None:
        grads = {"weight": xp.empty(C, dout.dtype), "bias": xp.empty(C, dout.dtype)}
    if kernels.enabled_for(d2, xhat, weight, grads["weight"], grads["bias"]):
        d2 = np.ascontiguousarray(d2)
        dx = np.empty_like(d2)
        kernels.layernorm_backward(d2, xhat, rstd[:, 0], weight, dx, grads["weight"],
                                   grads["bias"])
        return dx.reshape(dout.shape), grads
    ones = _filled(xp, N, 1.0, dout.dtype)
    g = d2 * xhat
    xp.matmul(ones, g, out=grads["weight"])
    xp.matmul(ones, d2, out=grads["bias"])
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dout * weight
    xp.multiply(d2, weight, out=g)
    inv_c = _filled(xp, C, 1.0 / C, dout.dtype)
    g_mean = g @ inv_c
    gx_mean = xp.einsum("nc,nc->n", g, xhat)
    gx_mean *= 1.0 / C
    g -= g_mean[:, None]
    xhat_term = xhat * gx_mean[:, None]
    g -= xhat_term
    g *= rstd
    return g.reshape(dout.shape), grads


_FILLED = {}


def _filled(xp, n, value, dtype):
    """A cached constant vector (for row/column sums as matrix-vector products)."""
    key = (xp.__name__, n, value, dtype)
    vec = _FILLED.get(key)
    if vec is None:
        vec = _FILLED[key] = xp.full(n, value, dtype)
    return vec


# --------------------------------------------------------------------------- linear


def linear_forward(weight, bias, x):
    """(Cin,Cout), (Cout,), (...,Cin) -> (...,Cout). GPT-2 stores weights as (in, out)."""
    # One 2-D GEMM: a 3-D @ 2-D matmul would loop over the batch in small GEMMs.
    out = add_into(gemm.matmul(x.reshape(-1, x.shape[-1]), weight), bias)
    out = out.reshape(*x.shape[:-1], weight.shape[1])
    return out, (x, weight)


def linear_backward(cache, dout, grads=None):
    """dout (...,Cout) -> dx (...,Cin), {weight: (Cin,Cout), bias: (Cout,)}."""
    x, weight = cache
    xp = array_module(dout)
    cin, cout = weight.shape
    d2 = dout.reshape(-1, cout)
    x2 = x.reshape(-1, cin)
    if grads is None:
        grads = {"weight": xp.empty_like(weight), "bias": xp.empty(cout, dout.dtype)}
    xp.matmul(_filled(xp, d2.shape[0], 1.0, d2.dtype), d2, out=grads["bias"])
    return _linear_backward_products(x2, weight, d2, grads, dout.shape[:-1])


def _linear_backward_products(x2, weight, d2, grads, lead_shape):
    """The weight gradient x2^T d2 into grads, and dx = d2 W^T (*lead_shape, Cin)."""
    gemm.matmul(x2.T, d2, out=grads["weight"])
    return gemm.matmul(d2, weight.T).reshape(*lead_shape, weight.shape[0]), grads


def linear_gelu_forward(weight, bias, x):
    """(Cin,Cout), (Cout,), (...,Cin) -> (...,Cout): gelu(x W + b), the MLP's first half."""
    x2 = x.reshape(-1, x.shape[-1])
    if not kernels.enabled_for(x2, weight, bias):
        h, c_linear = linear_forward(weight, bias, x)
        y, c_gelu = gelu_forward(h)
        return y, (c_linear, c_gelu)
    # The bias is added inside GELU's pass: one pass over the (tokens, 4C) product, not two.
    h = gemm.matmul(x2, weight)
    y, slope = np.empty_like(h), np.empty_like(h)
    kernels.gelu(h, y, slope, bias)
    return y.reshape(*x.shape[:-1], weight.shape[1]), ((x, weight), slope)


def linear_gelu_backward(cache, dout, grads=None):
    """dout (...,Cout) -> dx (...,Cin), {weight: (Cin,Cout), bias: (Cout,)}."""
    c_linear, c_gelu = cache
    d2 = dout.reshape(-1, dout.shape[-1])
    if not (isinstance(c_gelu, np.ndarray) and kernels.enabled_for(d2, c_gelu)
            and d2.flags.c_contiguous):
        dh, _ = gelu_backward(c_gelu, dout)
        return linear_backward(c_linear, dh, grads)
    x, weight = c_linear
    if grads is None:
        grads = {"weight": np.empty_like(weight), "bias": np.empty(weight.shape[1], d2.dtype)}
    # GELU's slope and the bias gradient (its column sums) in one pass over dout.
    dh = np.empty_like(d2)
    kernels.gelu_backward(d2, c_gelu.reshape(d2.shape), dh, grads["bias"])
    return _linear_backward_products(x.reshape(-1, x.shape[-1]), weight, dh, grads,
                                     dout.shape[:-1])


# --------------------------------------------------------------------------- GELU (tanh form)

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """(...) -> (...): 0.5 x (1 + tanh(u)), u = k (x + a x^3).

    The derivative, 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3a x^2) with t = tanh(u), is built
    here while each chunk of x and t is still in cache, and cached instead of t: backward
    is then a single multiply instead of a dozen passes over data long gone from cache.
    """
    if gpu_kernels.enabled_for(x):  # recomputes the slope in backward: one pass fewer here
        return gpu_kernels.gelu_forward(x), (FUSED_GPU, x)
    xp = array_module(x)
    out = xp.empty_like(x)
    slope = xp.empty_like(x)
    if kernels.enabled_for(x) and x.flags.c_contiguous:
        rows = (-1, x.shape[-1])
        kernels.gelu(x.reshape(rows), out.reshape(rows), slope.reshape(rows))
        return out, slope
    for xs, os, ss in _chunks(xp, x, out, slope):
        # x*x*x, never x**3: NumPy's generic power loop is ~250x slower.
        xp.multiply(xs, xs, out=ss)  # ss = x^2
        xp.multiply(ss, _GELU_K * _GELU_A, out=os)
        os += _GELU_K
        os *= xs
        xp.tanh(os, out=os)  # os = t
        ss *= 1.5 * _GELU_K * _GELU_A
        ss += 0.5 * _GELU_K
        ss *= xs  # ss = 0.5 x k (1 + 3a x^2)
        ts = os * os
        xp.subtract(1.0, ts, out=ts)
        ss *= ts  # ss = 0.5 x (1 - t^2) k (1 + 3a x^2)
        ss += 0.5
        xp.multiply(os, 0.5, out=ts)
        ss += ts  # ss = gelu'(x)
        os += 1.0
        os *= xs
        os *= 0.5  # os = 0.5 x (1 + t)
    return out, slope


def gelu_backward(cache, dout):
    """dout (...) -> dx (...) = dout * gelu'(x), the slope cached by forward."""
    if isinstance(cache, tuple):
        return gpu_kernels.gelu_backward(cache[1], array_module(dout).ascontiguousarray(dout)), {}
    return dout * cache, {}


_CHUNK = 32768  # elements: a chunk of each operand stays in L2 across a fused sequence of ops


def _chunks(xp, *arrays):
    """Yields matching flat slices of same-shaped contiguous arrays, sized to stay in cache
    on the CPU (on a GPU, one slice: launches cost more than cache misses)."""
    flats = [a.reshape(-1) for a in arrays]
    n = flats[0].size
    step = _CHUNK if xp is np else n
    for start in range(0, n, step):
        yield tuple(f[start:start + step] for f in flats)


# --------------------------------------------------------------------------- attention


def causal_mask(xp, T, dtype):
    """(T,T) additive mask in the transposed (key, query) layout: -inf where key > query."""
    mask = xp.zeros((T, T), dtype)
    mask[xp.tril_indices(T, -1)] = -xp.inf
    return mask


QUERY_BLOCK = 64


def attention_forward(qkv, n_head, mask=None, query_block=QUERY_BLOCK):
    """(B,T,3C) packed q|k|v -> (B,T,C): causal multi-head softmax(q k^T / sqrt(D)) v.
    `mask`, if given, is `causal_mask(xp, >=T, dtype)` (callers cache it).

    Queries go in blocks of `query_block`; a block scores only the keys it may see, so a
    causal model skips most of the masked half of the T x T work once T exceeds a block.
    Scores are kept transposed, (B,H,key,query), so the softmax reduces over axis -2: NumPy
    reduces across rows several times faster than along them. BLAS takes transposes free.
    """
    if gpu_kernels.enabled_for(qkv):
        y, cache = gpu_kernels.attention_forward(qkv, n_head)
        return y, (FUSED_GPU, cache)
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    mask = causal_mask(xp, T, qkv.dtype) if mask is None else mask
    fused = kernels.enabled_for(qkv)
    q, k, v = qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4)  # each (B,H,T,D)
    # Contiguous heads: the batched GEMMs below run faster than on strided views of qkv
    # (`small`: 9% for k and v, 7% more for q), for three copies a step. q needs its `out`:
    # a ufunc's result keeps its input's strided layout. Scaling q costs D/T of scaling scores.
    q = xp.multiply(q, 1.0 / math.sqrt(D), out=xp.empty((B, n_head, T, D), qkv.dtype))
    k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
    y_heads = xp.empty((B, n_head, T, D), qkv.dtype)
    blocks = []
    for start in range(0, T, query_block):
        stop = min(start + query_block, T)  # queries start:stop see keys 0:stop
        q_t = q[:, :, start:stop].transpose(0, 1, 3, 2)
        att = gemm.matmul(k[:, :, :stop], q_t)  # (B,H,stop,nq)
        if fused:  # the same causal rule as the mask, in one pass instead of five
            kernels.causal_softmax(att, start)
        else:
            att += mask[:stop, start:stop]
            att -= att.max(axis=-2, keepdims=True)
            xp.exp(att, out=att)
            att /= att.sum(axis=-2, keepdims=True)
        gemm.matmul(att.transpose(0, 1, 3, 2), v[:, :, :stop], out=y_heads[:, :, start:stop])
        blocks.append((start, stop, att))
    y = xp.ascontiguousarray(y_heads.transpose(0, 2, 1, 3))  # (B,T,H,D)
    return y.reshape(B, T, C), (q, k, v, blocks)


def attention_backward(cache, dout):
    """dout (B,T,C) -> d_qkv (B,T,3C)."""
    if cache[0] is FUSED_GPU:
        return gpu_kernels.attention_backward(cache[1], dout), {}
    q, k, v, blocks = cache  # q is pre-scaled by 1/sqrt(D); each att is (B,H,keys,queries)
    xp = array_module(dout)
    B, H, T, D = q.shape
    dy = xp.ascontiguousarray(dout.reshape(B, T, H, D).transpose(0, 2, 1, 3))  # (B,H,T,D)
    dq, dk, dv = (xp.empty((B, H, T, D), dout.dtype) for _ in range(3))
    # Keys and values collect gradient from every block that sees them. The last block sees
    # them all, so it goes first and writes dk and dv: no zero-fill, and the rest add.
    for i, (start, stop, att) in enumerate(reversed(blocks)):
        accumulate = i > 0
        dy_block = dy[:, :, start:stop]
        gemm.matmul(att, dy_block, out=dv[:, :, :stop], accumulate=accumulate)
        datt = gemm.matmul(v[:, :, :stop], dy_block.transpose(0, 1, 3, 2))  # (B,H,stop,nq)
        # softmax backward: ds = att * (datt - sum_k(datt * att)); masked entries stay 0
        if kernels.enabled_for(datt, att):
            kernels.softmax_backward(datt, att)
        else:
            row = datt * att
            datt -= row.sum(axis=-2, keepdims=True)
            datt *= att
        dq_block = dq[:, :, start:stop]
        gemm.matmul(datt.transpose(0, 1, 3, 2), k[:, :, :stop], out=dq_block)
        dq_block *= 1.0 / math.sqrt(D)
        gemm.matmul(datt, q[:, :, start:stop], out=dk[:, :, :stop], accumulate=accumulate)
    dqkv = xp.empty((B, T, 3, H, D), dout.dtype)
    for i, d in enumerate((dq, dk, dv)):
        dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
    return dqkv.reshape(B, T, 3 * H * D), {}


# --------------------------------------------------------------------------- loss


def lm_loss_forward(wte, h2, targets):
    """(V,C) tied embedding, (N,C) final hidden states, (N,) ids -> mean cross-entropy of
    the logits h2 wte^T. Class-major (V,N) logits on the CPU, where reductions across rows
    are fastest; row-major (N,V) on a GPU, one fused kernel per token row."""
    if gpu_kernels.enabled_for(wte, h2):
        logits = h2 @ wte.T
        loss = gpu_kernels.cross_entropy_forward(logits, targets)
        return loss, (FUSED_GPU, logits, h2, wte)  # logits now hold softmax - onehot
    loss, c_loss = softmax_cross_entropy_forward(gemm.matmul(wte, h2.T), targets)
    return loss, (None, c_loss, h2, wte)


def lm_loss_backward(cache, dloss, grads=None):
    """scalar dloss -> dh2 (N,C), {wte: (V,C)} (overwritten: the embedding adds its share)."""
    fused, c_loss, h2, wte = cache
    xp = array_module(h2)
    if grads is None:
        grads = {"wte": xp.empty_like(wte)}
    if fused is FUSED_GPU:  # dloss / N scales the two small GEMM outputs, not (N,V) logits
        scale = dloss / h2.shape[0]
        xp.matmul(c_loss.T, h2, out=grads["wte"])
        grads["wte"] *= scale
        dh = c_loss @ wte
        dh *= scale
        return dh, grads
    dlogits_t, _ = softmax_cross_entropy_backward(c_loss, dloss)  # (V,N)
    dlogits_t = dlogits_t.astype(h2.dtype, copy=False)
    gemm.matmul(dlogits_t, h2, out=grads["wte"])
    return gemm.matmul(dlogits_t.T, wte), grads


def softmax_cross_entropy_forward(logits_t, targets):
    """(V,N) class-major logits, (N,) int -> scalar mean over the N tokens of
    -log softmax(logits)[target]. Class-major so that the reductions run across rows."""
    xp = array_module(logits_t)
    V, N = logits_t.shape
    if logits_t.dtype.itemsize < 4:  # 16-bit logits: the loss and its softmax in float32
        logits_t = logits_t.astype(np.float32)
    probs = logits_t - logits_t.max(axis=0)
    xp.exp(probs, out=probs)
    probs /= _filled(xp, V, 1.0, probs.dtype) @ probs
    picked = probs[targets, xp.arange(N)]
    loss = -xp.log(picked).mean()
    return loss, (probs, targets)


def softmax_cross_entropy_backward(cache, dloss=1.0):
    """scalar dloss -> dlogits (V,N) = dloss * (softmax - onehot) / N. Reuses the probs buffer."""
    probs, targets = cache
    xp = array_module(probs)
    N = probs.shape[1]
    dlogits = probs  # the cache is consumed: backward runs once per forward
    dlogits[targets, xp.arange(N)] -= 1.0
    dlogits *= dloss / N
    return dlogits, {}
