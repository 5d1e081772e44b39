"""Megatron-style tensor-parallel layers, as forward/backward pairs in the style of `layers`.

A tensor-parallel group of tp ranks splits each weight matrix: a column-parallel linear
holds a slice of the output features, a row-parallel linear the matching slice of the input
features, so an MLP (column, GELU, row) or attention (column c_attn by heads, row c_proj)
needs one sum over the group forward and one backward. The vocabulary is split by rows of
wte for the embedding and for the tied LM head, whose cross-entropy never gathers the full
logits.

The group is an argument, duck-typed (`comm.group.RingGroup` is the real one): `size`,
`rank`, `all_reduce(x)` (in place), `all_gather(x, axis)`, `reduce_scatter(x, axis)`.
`SOLO` is a group of one, so every function here also runs in a single process and then
equals the unsplit layer.

Shapes: B batch, T time, C width, V vocabulary, N = B*T tokens; activations (B,T,C)
C-contiguous. With `sequence_parallel=True` the activations outside the tensor-parallel
regions (layer norms, residual stream) are (B,T/tp,C): rank r holds positions
[r*T/tp, (r+1)*T/tp). The all-reduce then becomes an all-gather along T on entry to the
region and a reduce-scatter along T on exit: the same bytes, but the work and memory outside
the region are split tp ways. Parameters used there (layer norms, the row-parallel bias)
see only this rank's positions, so their gradients must be summed over the group by the
caller.

Backward functions take an optional `grads` dict of preallocated arrays and overwrite them
(`vocab_embedding_backward` accumulates into "wte", which is tied to the LM head).
"""
from dataclasses import dataclass

import numpy as np

from comm.backend import array_module
from models import layers


class SoloGroup:
    """A tensor-parallel group of one: every collective returns its input unchanged."""

    size = 1
    rank = 0
    bytes_sent = 0

    def all_reduce(self, x):
        return x

    def all_gather(self, x, axis):
        return x

    def reduce_scatter(self, x, axis):
        return x

    def reset_bytes(self):
        return 0

    def __repr__(self):
        return "SOLO"


SOLO = SoloGroup()


@dataclass(frozen=True)
class TensorParallel:
    """How this rank's layers are split: the tensor-parallel group (models/parallel.py's
    interface; SOLO when unsplit) and whether the LayerNorm regions hold a slice of the
    sequence (Megatron's sequence parallelism)."""
    group: object = SOLO
    sequence_parallel: bool = False

    @property
    def size(self):
        return self.group.size


# --------------------------------------------------------------------------- conjugate operators
# Megatron's f and g, and their sequence-parallel forms. The cache is the group.


def copy_forward(x, group):
    """f: (...) -> (...) identity; entering a region whose ranks all read the same x."""
    return x, group


def copy_backward(cache, dx):
    """dx (...) -> dx summed over the group, in place: each rank's dx holds only the part of
    the gradient that flows through its shard of the weights."""
    return cache.all_reduce(_contiguous(dx)), {}


def reduce_forward(x, group):
    """g: (...) partial sums -> (...) summed over the group, in place."""
    return group.all_reduce(_contiguous(x)), group


def reduce_backward(cache, dx):
    """dx (...) -> dx: the sum's gradient reaches every addend unchanged."""
    return dx, {}


def gather_sequence_forward(x, group):
    """(B,T/tp,C) this rank's positions -> (B,T,C) all of them (all-gather along T)."""
    return group.all_gather(x, 1), group


def gather_sequence_backward(cache, dx):
    """dx (B,T,C), a partial gradient on each rank -> (B,T/tp,C) its sum at this rank's
    positions (reduce-scatter along T)."""
    return cache.reduce_scatter(dx, 1), {}


def scatter_sequence_forward(x, group):
    """(B,T,C) partial sums -> (B,T/tp,C) the sum at this rank's positions (reduce-scatter)."""
    return group.reduce_scatter(x, 1), group


def scatter_sequence_backward(cache, dx):
    """dx (B,T/tp,C) -> (B,T,C): every rank's positions (all-gather along T)."""
    return cache.all_gather(dx, 1), {}


def _contiguous(x):
    return array_module(x).ascontiguousarray(x)  # the ring sums flat buffers


# --------------------------------------------------------------------------- linear


def column_linear_forward(weight, bias, x, group, sequence_parallel=False):
    """(Cin,Cout/tp), (Cout/tp,), (B,T,Cin) [(B,T/tp,Cin) under SP] -> (B,T,Cout/tp)."""
    return _column_forward(layers.linear_forward, weight, bias, x, group, sequence_parallel)


def column_linear_backward(cache, dy, grads=None):
    """dy (B,T,Cout/tp) -> dx (x's shape: summed over the group, or reduce-scattered under
    SP), {weight: (Cin,Cout/tp), bias: (Cout/tp,)} this rank's shards."""
    return _column_backward(layers.linear_backward, cache, dy, grads)


def column_linear_gelu_forward(weight, bias, x, group, sequence_parallel=False):
    """As column_linear_forward, -> gelu(x W + b) (B,T,Cout/tp): the MLP's first half, with
    GELU in the fused layer pair (layers.linear_gelu_forward), split as unsplit."""
    return _column_forward(layers.linear_gelu_forward, weight, bias, x, group,
                           sequence_parallel)


def column_linear_gelu_backward(cache, dy, grads=None):
    """As column_linear_backward, through GELU first."""
    return _column_backward(layers.linear_gelu_backward, cache, dy, grads)


def _column_forward(layer_forward, weight, bias, x, group, sequence_parallel):
    enter = gather_sequence_forward if sequence_parallel else copy_forward
    # Under SP the cache keeps the gathered (B,T,Cin) input: Megatron gathers it again in
    # backward to save that memory, at the price of one more all-gather per layer.
    x_full, enter_cache = enter(x, group)
    y, layer_cache = layer_forward(weight, bias, x_full)
    return y, (layer_cache, enter_cache, sequence_parallel)


def _column_backward(layer_backward, cache, dy, grads):
    layer_cache, enter_cache, sequence_parallel = cache
    dx_partial, grads = layer_backward(layer_cache, dy, grads)
    enter_backward = gather_sequence_backward if sequence_parallel else copy_backward
    dx, _ = enter_backward(enter_cache, dx_partial)
    return dx, grads


def row_linear_forward(weight, bias, x, group, sequence_parallel=False):
    """(Cin/tp,Cout), (Cout,) replicated, (B,T,Cin/tp) -> (B,T,Cout) [(B,T/tp,Cout) under SP]:
    the sum over ranks of x @ weight, plus bias once."""
    xp = array_module(x)
    # The bias goes in after the sum (a zero one here), or the sum would add it tp times.
    zero_bias = layers._filled(xp, weight.shape[1], 0.0, weight.dtype)
    partial, linear_cache = layers.linear_forward(weight, zero_bias, x)
    leave = scatter_sequence_forward if sequence_parallel else reduce_forward
    y, leave_cache = leave(partial, group)
    y += bias
    return y, (linear_cache, leave_cache, sequence_parallel)


def row_linear_backward(cache, dy, grads=None):
    """dy (y's shape) -> dx (B,T,Cin/tp), {weight: (Cin/tp,Cout) this rank's shard,
    bias: (Cout,)}.

    Without SP dy is the same on every rank and so is the bias gradient. Under SP the bias
    gradient sums dy over this rank's positions only: the caller sums it over the group
    (as for the layer norms of the sequence-parallel region).
    """
    linear_cache, leave_cache, sequence_parallel = cache
    leave_backward = scatter_sequence_backward if sequence_parallel else reduce_backward
    dy_full, _ = leave_backward(leave_cache, dy)
    dx, grads = layers.linear_backward(linear_cache, dy_full, grads)
    if sequence_parallel:
        # linear_backward summed the gathered dy (every position); the bias was added to
        # this rank's positions only. One extra GEMV, against the GEMMs above.
        xp = array_module(dy)
        d2 = dy.reshape(-1, dy.shape[-1])
        xp.matmul(layers._filled(xp, d2.shape[0], 1.0, d2.dtype), d2, out=grads["bias"])
    return dx, grads


# --------------------------------------------------------------------------- embedding


def vocab_embedding_forward(wte, vocab_start, idx, group, sequence_parallel=False):
    """(V/tp,C) rows [vocab_start, vocab_start+V/tp) of wte, (B,T) int ids (all positions,
    every rank) -> (B,T,C) [(B,T/tp,C) under SP] token embeddings; no position embedding."""
    xp = array_module(wte)
    V_local = wte.shape[0]
    local = idx - vocab_start
    mine = (local >= 0) & (local < V_local)
    local = xp.where(mine, local, 0)  # any valid row: zeroed below
    out = wte[local]
    out[~mine] = 0  # ids held by other ranks come from their sum
    leave = scatter_sequence_forward if sequence_parallel else reduce_forward
    y, leave_cache = leave(out, group)
    return y, (local.reshape(-1), mine.reshape(-1), wte.shape, leave_cache, sequence_parallel)


def vocab_embedding_backward(cache, dout, grads=None):
    """dout (y's shape) -> None (ids have no gradient), {wte: (V/tp,C) accumulated (+=) at the
    rows of this rank's ids}."""
    local, mine, wte_shape, leave_cache, sequence_parallel = cache
    xp = array_module(dout)
    if grads is None:
        grads = {"wte": xp.zeros(wte_shape, dout.dtype)}
    leave_backward = scatter_sequence_backward if sequence_parallel else reduce_backward
    dout_full, _ = leave_backward(leave_cache, dout)  # every position's gradient
    rows = xp.flatnonzero(mine)
    if rows.size:  # _scatter_add needs at least one row
        d2 = dout_full.reshape(-1, dout_full.shape[-1])
        layers._scatter_add(xp, grads["wte"], local[rows], d2[rows])
    return None, grads


# --------------------------------------------------------------------------- loss


def vocab_cross_entropy_forward(logits_t, targets, vocab_start, vocab_size, group):
    """(V/tp,N) class-major logits of rows [vocab_start, vocab_start+V/tp) of a vocabulary
    padded to V >= vocab_size, (N,) int targets < vocab_size -> scalar mean over the N tokens
    of -log softmax(logits)[target], the same on every rank. Rows with ids >= vocab_size are
    padding: probability exactly 0.

    Three collectives of (N,) vectors, never the logits: an all-gather of the local maxima
    (the ring only sums), then one all-reduce of the exponentials' sums and target logits.
    """
    xp = array_module(logits_t)
    V_local, N = logits_t.shape
    real = min(max(vocab_size - vocab_start, 0), V_local)  # rows [0, real) are real ids
    if real:
        local_max = logits_t[:real].max(axis=0)
    else:  # a rank of padding only: -inf loses every max
        local_max = xp.full(N, -xp.inf, logits_t.dtype)
    gmax = group.all_gather(local_max, 0).reshape(group.size, N).max(axis=0)
    probs = xp.empty_like(logits_t)
    shifted = probs[:real]
    xp.subtract(logits_t[:real], gmax, out=shifted)  # padding logits never meet exp
    probs[real:] = 0
    cols = xp.arange(N)
    t_local = targets - vocab_start
    hit = (t_local >= 0) & (t_local < real)
    sums = xp.zeros((2, N), logits_t.dtype)  # one all-reduce: [sum of exp, target logit]
    sums[1, hit] = shifted[t_local[hit], cols[hit]]
    xp.exp(shifted, out=shifted)
    xp.matmul(layers._filled(xp, V_local, 1.0, probs.dtype), probs, out=sums[0])
    group.all_reduce(sums)
    total, target_logit = sums
    probs /= total
    # log(sum exp) - logit: no log of an underflowed probability.
    loss = (xp.log(total) - target_logit).mean()
    return loss, (probs, t_local[hit], cols[hit])


def vocab_cross_entropy_backward(cache, dloss=1.0):
    """scalar dloss -> dlogits (V/tp,N) = dloss * (softmax - onehot) / N at this rank's rows
    (0 at padding rows); no communication. Reuses the probs buffer."""
    probs, rows, cols = cache
    N = probs.shape[1]
    dlogits = probs  # the cache is consumed: backward runs once per forward
    dlogits[rows, cols] -= 1.0
    dlogits *= dloss / N
    return dlogits, {}


# --------------------------------------------------------------------------- shards


def vocab_shard(vocab_size, tp, rank, multiple=1):
    """-> (padded vocabulary, start, stop): the smallest multiple of tp*multiple >= vocab_size,
    and rank's rows [start, stop) of it."""
    step = tp * multiple
    padded = -(-vocab_size // step) * step
    per_rank = padded // tp
    return padded, rank * per_rank, (rank + 1) * per_rank


def qkv_columns(n_embd, tp, rank):
    """-> (3C/tp,) int: the columns of the global c_attn (q|k|v, each C wide, heads of D
    contiguous) that rank's (C,3C/tp) shard holds, as q_r | k_r | v_r.

    With n_head divisible by tp, rank r holds heads [r*H/tp, (r+1)*H/tp), so that
    layers.attention_forward(local_qkv, n_head // tp) computes exactly them; its (B,T,C/tp)
    output is columns [r*C/tp, (r+1)*C/tp) of the full one, i.e. it meets rows
    [r*C/tp, (r+1)*C/tp) of c_proj's weight (a row-parallel linear).
    """
    if n_embd % tp:
        raise ValueError(f"n_embd {n_embd} does not split into {tp} equal parts")
    width = n_embd // tp
    mine = np.arange(rank * width, (rank + 1) * width)
    return np.concatenate([part * n_embd + mine for part in range(3)])
