"""A classification head on the GPT's final hidden state, as forward/backward pairs.

hidden (B,T,C) -> pooled (B,C) -> logits (B,K) = pooled @ weight + bias -> mean softmax
cross-entropy over the batch.  Shapes use B batch, T time, C channels, K classes.  Rows are
padded past their `lengths`; pooling reads only real tokens, so padding gets no gradient.

- `pool="last"`: the hidden state of the last real token, the only one whose causal
  attention has seen the whole text;
- `pool="mean"`: the mean over the real tokens.

`ClassTargets`, `head_forward` and `head_backward` make it the GPT's last-chunk head
(models/gpt.py): the same call under every layout of the step engine.
"""
from dataclasses import dataclass

from comm.backend import array_module
from models.layers import (linear_backward, linear_forward, softmax_cross_entropy_backward,
                           softmax_cross_entropy_forward)

POOLS = ("last", "mean")


def pool_forward(hidden, lengths, pool="last"):
    """(B,T,C), (B,) int in 1..T, same array module -> (B,C): last real state or real mean."""
    xp = array_module(hidden)
    B, T, _ = hidden.shape
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "last":
        return hidden[xp.arange(B), lengths - 1], (pool, hidden.shape, lengths)
    # (B,T) weights 1/length on real tokens, 0 on padding: one batched GEMV does the mean
    weights = (xp.arange(T)[None, :] < lengths[:, None]).astype(hidden.dtype)
    weights /= lengths[:, None]
    pooled = (weights[:, None, :] @ hidden)[:, 0]
    return pooled, (pool, hidden.shape, weights)


def pool_backward(cache, dpooled):
    """dpooled (B,C) -> dhidden (B,T,C), zero at padded positions."""
    pool, shape, saved = cache
    xp = array_module(dpooled)
    if pool == "last":
        dhidden = xp.zeros(shape, dpooled.dtype)
        dhidden[xp.arange(shape[0]), saved - 1] = dpooled
        return dhidden
    return saved[:, :, None] * dpooled[:, None, :]


def logits_forward(weight, bias, hidden, lengths, pool="last"):
    """(C,K), (K,), (B,T,C), (B,) int -> logits (B,K), for predictions and the loss."""
    pooled, pool_cache = pool_forward(hidden, lengths, pool)
    logits, linear_cache = linear_forward(weight, bias, pooled)
    return logits, (pool_cache, linear_cache)


def logits_backward(cache, dlogits, grads=None):
    """dlogits (B,K) -> dhidden (B,T,C), {weight: (C,K), bias: (K,)}."""
    pool_cache, linear_cache = cache
    dpooled, grads = linear_backward(linear_cache, dlogits, grads)
    return pool_backward(pool_cache, dpooled), grads


def classifier_forward(weight, bias, hidden, lengths, labels, pool="last"):
    """(C,K), (K,), (B,T,C), (B,) int, (B,) int -> scalar mean cross-entropy over B."""
    xp = array_module(hidden)
    logits, logits_cache = logits_forward(weight, bias, hidden, lengths, pool)
    # The loss wants class-major (K,B) logits: its reductions then run across rows.
    loss, loss_cache = softmax_cross_entropy_forward(xp.ascontiguousarray(logits.T), labels)
    return loss, (logits_cache, loss_cache)


def classifier_backward(cache, dloss=1.0, grads=None):
    """scalar dloss -> dhidden (B,T,C), {weight: (C,K), bias: (K,)}."""
    logits_cache, loss_cache = cache
    dlogits_t, _ = softmax_cross_entropy_backward(loss_cache, dloss)
    xp = array_module(dlogits_t)
    return logits_backward(logits_cache, xp.ascontiguousarray(dlogits_t.T), grads)


@dataclass(frozen=True)
class ClassTargets:
    """A classifier's targets: (B,) real lengths and (B,) labels. Indexed by rows like the
    language model's (B,T) next-token ids, so the step engine cuts both alike."""
    lengths: object
    labels: object

    def __getitem__(self, rows):
        return ClassTargets(self.lengths[rows], self.labels[rows])


def head_forward(weight, bias, hidden, targets: ClassTargets, pool, tp):
    """(C,K), (K,), (B,T,C) normed hidden state ((B,T/tp,C) under sequence parallelism)
    -> scalar loss. Tensor-parallel ranks each compute the whole (tiny) head, replicated."""
    if tp.sequence_parallel:
        hidden = tp.group.all_gather(hidden, 1)
    loss, cache = classifier_forward(weight, bias, hidden, targets.lengths, targets.labels,
                                     pool)
    return loss, (cache, tp)


def head_backward(cache, dloss, grads):
    """scalar dloss -> dhidden in head_forward's layout; overwrites grads {weight, bias}."""
    cache, tp = cache
    dhidden, _ = classifier_backward(cache, dloss, grads)
    if not tp.sequence_parallel:
        return dhidden
    # every rank holds the whole (not a partial) gradient: it keeps its own positions
    T_local = dhidden.shape[1] // tp.size
    start = tp.group.rank * T_local
    return array_module(dhidden).ascontiguousarray(dhidden[:, start:start + T_local])
