"""AdamW, the learning-rate schedule and global-norm gradient clipping.

The optimizer works on flat 1-D buffers (parameters, gradients, moments), so one step is a
handful of vectorised passes over the whole model instead of a loop over tensors. Which
elements are decayed is a 0/1 mask of the same length, built from parameter names.
"""
import math

import numpy as np

from comm.backend import array_module, to_host
from models import gpu_kernels, kernels


def decay_mask(flat_params, is_decayed, xp=np):
    """A flat 0/1 array: 1 where weight decay applies (matrices), 0 for biases and norms."""
    mask = np.zeros(flat_params.size, dtype=np.float64)
    for name, start in flat_params.offsets.items():
        if is_decayed(name):
            mask[start:start + int(np.prod(flat_params.shapes[name]))] = 1.0
    return xp.asarray(mask, dtype=flat_params.flat.dtype)


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter; torch.optim.AdamW's order:
    decay, then the Adam step), on one flat parameter buffer.

    `params` and `grads` are 1-D arrays of the same length; `mask` (0/1) says which elements
    decay. `ranges`, a list of (start, stop), limits the update to the elements this rank
    owns (ZeRO-1); moments are kept, in the parameter dtype, for those elements only.
    `lr_scales`, a list of disjoint (start, stop, factor), gives those elements the learning
    rate lr * factor, decay included (torch's parameter groups: a fine-tuned head learns
    faster than the pre-trained trunk).
    """

    # Elements per pass: the five arrays of a chunk (p, g, m, v, scratch) stay in L2 cache,
    # so the dozen passes of an Adam step cost about one trip to memory.
    CHUNK = 32768

    def __init__(self, params, mask, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                 ranges=None, lr_scales=None):
        xp = array_module(params)
        self.params = params
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        ranges = [(0, params.size)] if ranges is None else [(a, b) for a, b in ranges if b > a]
        self.ranges = ranges  # m and v hold these elements of `params`, packed in order
        self.owned = sum(b - a for a, b in ranges)
        self.m = xp.zeros(self.owned, params.dtype)
        self.v = xp.zeros(self.owned, params.dtype)
        self.t = 0
        # On a GPU one pass per range beats many small kernel launches.
        chunk = self.CHUNK if xp is np else max(1, params.size)
        pieces = []  # (start, stop, offset of the piece in m and v)
        offset = 0
        for a, b in ranges:
            for start in range(a, b, chunk):
                stop = min(start + chunk, b)
                pieces.append((start, stop, offset + start - a))
            offset += b - a
        scales = sorted(lr_scales or [])
        self.pieces = _cut_by_scales(pieces, scales)  # (start, stop, at, lr factor)
        self._tmp = xp.empty(max((b - a for a, b, _ in pieces), default=0), params.dtype)
        self.decay_runs = _cut_by_scales([(a, b, a) for a, b in
                                          _intersect(_runs_of_ones(mask), ranges)], scales)

    def step(self, grads, lr):
        self.t += 1
        if self.weight_decay:
            for start, stop, _, scale in self.decay_runs:
                self.params[start:stop] *= 1.0 - lr * scale * self.weight_decay
        for start, stop, at, scale in self.pieces:
            n = stop - start
            self._adam(self.params[start:stop], grads[start:stop], self.m[at:at + n],
                       self.v[at:at + n], lr * scale)

    def _adam(self, p, g, m, v, lr):
        xp = array_module(p)
        b1, b2 = self.beta1, self.beta2
        fused = gpu_kernels.adam if gpu_kernels.enabled_for(p, g, m, v) else \
            kernels.adam if kernels.enabled_for(p, g, m, v) else None
        if fused is not None:  # one pass, the bias corrections folded into two scalars
            fused(p, g, m, v, b1, b2, lr / (1.0 - b1 ** self.t),
                  1.0 / math.sqrt(1.0 - b2 ** self.t), self.eps)
            return
        tmp = self._tmp[:p.size]
        # m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2
        m *= b1
        xp.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        # p -= lr/bias1 * m / (sqrt(v)/sqrt(bias2) + eps): bias corrections folded in scalars
        xp.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(1.0 - b2 ** self.t)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= lr / (1.0 - b1 ** self.t)
        p -= tmp


def _intersect(runs, ranges):
    """The parts of `runs` inside `ranges` (both sorted lists of (start, stop))."""
    out = []
    for a, b in runs:
        for c, d in ranges:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((lo, hi))
    return out


def _cut_by_scales(pieces, scales):
    """(start, stop, at, factor): each (start, stop, at) of `pieces` cut where a range of
    `scales` (sorted (start, stop, factor)) begins or ends, with that range's factor (1
    outside them); `at` moves with `start`."""
    out = []
    for start, stop, at in pieces:
        cuts = sorted({start, stop} | {edge for a, b, _ in scales for edge in (a, b)
                                       if start < edge < stop})
        for lo, hi in zip(cuts, cuts[1:]):
            factor = next((f for a, b, f in scales if a <= lo < b), 1.0)
            out.append((lo, hi, at + lo - start, factor))
    return out


def _runs_of_ones(mask):
    """[(start, stop), ...] of the maximal runs of 1 in a 0/1 vector (computed on the host)."""
    host = to_host(mask) != 0
    edges = np.flatnonzero(np.diff(np.concatenate([[False], host, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def lr_at(step, max_lr, min_lr, warmup_steps, total_steps):
    """Linear warm-up from max_lr/warmup to max_lr, then cosine decay to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def global_norm(flat_grads):
    """The L2 norm of all gradients together, as a Python float."""
    xp = array_module(flat_grads)
    return math.sqrt(float(xp.vdot(flat_grads, flat_grads)))


def clip_by_global_norm(flat_grads, max_norm, norm=None):
    """Scales the gradients in place so their global norm is at most max_norm (0 = off).
    Returns the norm before clipping."""
    norm = global_norm(flat_grads) if norm is None else norm
    if max_norm > 0 and norm > max_norm:
        flat_grads *= max_norm / (norm + 1e-6)
    return norm
