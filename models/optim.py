"""AdamW, the learning-rate schedule and global-norm gradient clipping.

The optimizer works on flat 1-D buffers (parameters, gradients, moments), so one step is a
handful of vectorised passes over the whole model instead of a loop over tensors. Which
elements are decayed is a 0/1 mask of the same length, built from parameter names.
"""
import math

import numpy as np

from comm.backend import array_module


def decay_mask(flat_params, is_decayed, xp=np):
    """A flat 0/1 array: 1 where weight decay applies (matrices), 0 for biases and norms."""
    mask = np.zeros(flat_params.size, dtype=np.float64)
    for name, start in flat_params.offsets.items():
        if is_decayed(name):
            mask[start:start + int(np.prod(flat_params.shapes[name]))] = 1.0
    return xp.asarray(mask, dtype=flat_params.flat.dtype)


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), on one flat parameter buffer.

    `params` and `grads` are 1-D arrays of the same length; `mask` says which elements decay.
    Moments are kept in the parameter dtype.
    """

    def __init__(self, params, mask, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
        xp = array_module(params)
        self.params = params
        self.mask = mask
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = xp.zeros_like(params)
        self.v = xp.zeros_like(params)
        self.t = 0
        self._tmp = xp.empty_like(params)

    def step(self, grads, lr):
        xp = array_module(self.params)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        m, v, tmp, p = self.m, self.v, self._tmp, self.params
        # m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2
        m *= b1
        xp.multiply(grads, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        xp.multiply(grads, grads, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        # p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * mask * p)
        bias1 = 1.0 - b1 ** self.t
        bias2 = 1.0 - b2 ** self.t
        xp.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bias2)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= lr / bias1
        p -= tmp
        if self.weight_decay:
            xp.multiply(p, self.mask, out=tmp)
            tmp *= lr * self.weight_decay
            p -= tmp


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
