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
    # Summing rows with equal ids: add.at is unbuffered, so repeated ids accumulate.
    _scatter_add(xp, dwte, idx.reshape(-1), dout.reshape(B * T, C))
    dwpe[T:] = 0
    dout.sum(axis=0, out=dwpe[:T])
    return None, grads


def _scatter_add(xp, target, rows, values):
    if xp is np:
        np.add.at(target, rows, values)
    else:  # CuPy spells the unbuffered scatter-add differently
        xp.add.at(target, rows, values)


# --------------------------------------------------------------------------- layer norm


def layernorm_forward(weight, bias, x, eps=1e-5):
    """(C,), (C,), (...,C) -> (...,C), normalised over the last axis."""
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    xhat = x - mean
    var = xp.einsum("...c,...c->...", xhat, xhat)[..., None]
    var *= 1.0 / x.shape[-1]
    var += eps
    rstd = xp.sqrt(var, out=var)
    xp.reciprocal(rstd, out=rstd)
    xhat *= rstd
    out = xhat * weight
    out += bias
    return out, (xhat, rstd, weight)


def layernorm_backward(cache, dout, grads=None):
    """dout (...,C) -> dx (...,C), {weight, bias}: (C,)."""
    xhat, rstd, weight = cache
    xp = array_module(dout)
    C = dout.shape[-1]
    d2 = dout.reshape(-1, C)
    x2 = xhat.reshape(-1, C)
    if grads is None:
        grads = {"weight": xp.empty(C, dout.dtype), "bias": xp.empty(C, dout.dtype)}
    xp.einsum("nc,nc->c", d2, x2, out=grads["weight"])
    d2.sum(axis=0, out=grads["bias"])
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dout * weight
    g = dout * weight
    g_mean = g.mean(axis=-1, keepdims=True)
    gx_mean = xp.einsum("...c,...c->...", g, xhat)[..., None]
    gx_mean *= 1.0 / C
    g -= g_mean
    xhat_term = xhat * gx_mean
    g -= xhat_term
    g *= rstd
    return g, grads


# --------------------------------------------------------------------------- linear


def linear_forward(weight, bias, x):
    """(Cin,Cout), (Cout,), (...,Cin) -> (...,Cout). GPT-2 stores weights as (in, out)."""
    # One 2-D GEMM: a 3-D @ 2-D matmul would loop over the batch in small GEMMs.
    out = x.reshape(-1, x.shape[-1]) @ weight
    out += bias
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
    xp.matmul(x2.T, d2, out=grads["weight"])
    d2.sum(axis=0, out=grads["bias"])
    dx = (d2 @ weight.T).reshape(*dout.shape[:-1], cin)
    return dx, grads


# --------------------------------------------------------------------------- GELU (tanh form)

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """(...) -> (...): 0.5 x (1 + tanh(k (x + a x^3)))."""
    xp = array_module(x)
    # x*x*x, never x**3: NumPy's generic power loop is ~250x slower.
    t = x * x
    t *= _GELU_A
    t += 1.0
    t *= x
    t *= _GELU_K
    xp.tanh(t, out=t)  # t = tanh(u)
    out = t + 1.0
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(cache, dout):
    """dout (...) -> dx (...). d/dx = 0.5(1+t) + 0.5 x (1-t^2) k (1 + 3a x^2)."""
    x, t = cache
    # inner = 0.5 x k (1 + 3a x^2), built in one buffer
    inner = x * x
    inner *= 3.0 * _GELU_A
    inner += 1.0
    inner *= x
    inner *= 0.5 * _GELU_K
    sech2 = t * t  # 1 - t^2, negated in place below
    sech2 -= 1.0
    sech2 *= inner  # = -(1 - t^2) * inner
    dx = t + 1.0
    dx *= 0.5
    dx -= sech2
    dx *= dout
    return dx, {}


# --------------------------------------------------------------------------- attention


def causal_mask(xp, T, dtype):
    """(T,T) additive mask: 0 on and below the diagonal, -inf above."""
    mask = xp.zeros((T, T), dtype)
    mask[xp.triu_indices(T, 1)] = -xp.inf
    return mask


def attention_forward(qkv, n_head, mask=None):
    """(B,T,3C) packed q|k|v -> (B,T,C): causal multi-head softmax(q k^T / sqrt(D)) v."""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4)  # each (B,H,T,D)
    att = q @ k.transpose(0, 1, 3, 2)  # (B,H,T,T)
    att *= 1.0 / math.sqrt(D)
    att += causal_mask(xp, T, att.dtype) if mask is None else mask[:T, :T]
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = xp.empty((B, T, n_head, D), qkv.dtype)
    xp.matmul(att, v, out=y.transpose(0, 2, 1, 3))
    return y.reshape(B, T, C), (q, k, v, att)


def attention_backward(cache, dout):
    """dout (B,T,C) -> d_qkv (B,T,3C)."""
    q, k, v, att = cache
    xp = array_module(dout)
    B, H, T, D = q.shape
    dy = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B,H,T,D)
    dqkv = xp.empty((B, T, 3, H, D), dout.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)
    xp.matmul(att.transpose(0, 1, 3, 2), dy, out=dv)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B,H,T,T)
    # softmax backward: ds = att * (datt - sum(datt * att)); masked entries stay 0 as att is 0
    row = xp.einsum("bhij,bhij->bhi", datt, att)[..., None]
    datt -= row
    datt *= att
    datt *= 1.0 / math.sqrt(D)
    xp.matmul(datt, k, out=dq)
    xp.matmul(datt.transpose(0, 1, 3, 2), q, out=dk)
    return dqkv.reshape(B, T, 3 * H * D), {}


# --------------------------------------------------------------------------- loss


def softmax_cross_entropy_forward(logits, targets):
    """(N,V), (N,) int -> scalar mean over the N tokens of -log softmax(logits)[target]."""
    xp = array_module(logits)
    N = logits.shape[0]
    probs = logits - logits.max(axis=-1, keepdims=True)
    xp.exp(probs, out=probs)
    sums = probs.sum(axis=-1, keepdims=True)
    probs /= sums
    picked = probs[xp.arange(N), targets]
    loss = -xp.log(picked).mean()
    return loss, (probs, targets)


def softmax_cross_entropy_backward(cache, dloss=1.0):
    """scalar dloss -> dlogits (N,V) = dloss * (softmax - onehot) / N. Reuses the probs buffer."""
    probs, targets = cache
    xp = array_module(probs)
    N = probs.shape[0]
    dlogits = probs  # the cache is consumed: backward runs once per forward
    dlogits[xp.arange(N), targets] -= 1.0
    dlogits *= dloss / N
    return dlogits, {}
