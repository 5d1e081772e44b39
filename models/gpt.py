"""GPT-2 style decoder: configuration, parameter naming, initialisation, forward and backward.

Parameters are a flat name -> array mapping with GPT-2's names and full logical shapes
(`wte`, `wpe`, `h.{i}.ln_1.weight`, `h.{i}.attn.c_attn.weight`, ..., `ln_f.bias`). All of them
are views into one contiguous buffer (`FlatParams`), so the optimizer, gradient clipping and
(later) gradient all-reduce each work on a single array instead of dozens of small ones.

The LM head is tied to `wte`: logits = x @ wte.T, and wte's gradient is the sum of the
head's and the embedding's contributions.
"""
from dataclasses import dataclass

import numpy as np

from comm.backend import array_module
from models import layers


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = 256


EMBEDDING_PARAMS = ("wte", "wpe")
HEAD_PARAMS = ("ln_f.weight", "ln_f.bias")  # plus the tied wte


def block_shapes(C: int) -> dict:
    """Suffix -> shape of one block's parameters (`h.{i}.` + suffix)."""
    return {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }


BLOCK_SUFFIXES = tuple(block_shapes(1))


def block_param_names(i: int) -> tuple:
    return tuple(f"h.{i}.{suffix}" for suffix in BLOCK_SUFFIXES)


def param_shapes(cfg: GPTConfig) -> dict:
    """Name -> shape for every parameter, in forward order (embedding, blocks, final norm)."""
    C = cfg.n_embd
    shapes = {"wte": (cfg.vocab_size, C), "wpe": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{suffix}": shape for suffix, shape in block_shapes(C).items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def num_params(cfg: GPTConfig) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(cfg).values())


def is_decayed(name: str) -> bool:
    """AdamW decays matrices only: not biases, not LayerNorm gains."""
    return not (name.endswith(".bias") or ".ln_" in name or name.startswith("ln_"))


class FlatParams:
    """One contiguous 1-D buffer with a named view per parameter (or per gradient)."""

    def __init__(self, shapes: dict, xp=np, dtype=np.float32, buffer=None):
        self.shapes = dict(shapes)
        self.offsets = {}
        offset = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += int(np.prod(shape))
        self.size = offset
        self.flat = xp.zeros(offset, dtype) if buffer is None else buffer
        if self.flat.shape != (offset,):
            raise ValueError(f"buffer has shape {self.flat.shape}, expected ({offset},)")
        self.views = {name: self.view(name) for name in self.shapes}

    def view(self, name):
        start = self.offsets[name]
        shape = self.shapes[name]
        return self.flat[start:start + int(np.prod(shape))].reshape(shape)

    def like(self):
        """A zeroed FlatParams of the same layout (for gradients or optimizer moments)."""
        return FlatParams(self.shapes, array_module(self.flat), self.flat.dtype)

    def __getitem__(self, name):
        return self.views[name]

    def __iter__(self):
        return iter(self.views)

    def items(self):
        return self.views.items()


def init_params(cfg: GPTConfig, seed: int, xp=np, dtype=np.float32) -> FlatParams:
    """GPT-2 initialisation: N(0, 0.02) matrices and embeddings, residual projections scaled
    by 1/sqrt(2 n_layer), zero biases, unit LayerNorm gains. Drawn on the host in float64
    so that every device and dtype starts from the same numbers."""
    rng = np.random.default_rng(seed)
    host = FlatParams(param_shapes(cfg), np, np.float64)
    residual_std = 0.02 / np.sqrt(2 * cfg.n_layer)
    for name, view in host.items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            view[...] = 1.0
        elif name.endswith(".bias"):
            view[...] = 0.0
        elif name.endswith("c_proj.weight"):
            view[...] = rng.normal(0.0, residual_std, view.shape)
        else:
            view[...] = rng.normal(0.0, 0.02, view.shape)
    return FlatParams(host.shapes, xp, dtype, buffer=xp.asarray(host.flat, dtype=dtype))


# --------------------------------------------------------------------------- forward/backward


def block_forward(params, prefix, x, n_head, mask):
    """(B,T,C) -> (B,T,C): x + attn(ln_1(x)), then + mlp(ln_2(.))."""
    p = lambda name: params[prefix + name]  # noqa: E731
    h, c_ln1 = layers.layernorm_forward(p("ln_1.weight"), p("ln_1.bias"), x)
    qkv, c_qkv = layers.linear_forward(p("attn.c_attn.weight"), p("attn.c_attn.bias"), h)
    a, c_att = layers.attention_forward(qkv, n_head, mask)
    a, c_proj = layers.linear_forward(p("attn.c_proj.weight"), p("attn.c_proj.bias"), a)
    a += x  # residual, in place in the fresh projection output
    h, c_ln2 = layers.layernorm_forward(p("ln_2.weight"), p("ln_2.bias"), a)
    h, c_fc = layers.linear_forward(p("mlp.c_fc.weight"), p("mlp.c_fc.bias"), h)
    h, c_gelu = layers.gelu_forward(h)
    out, c_mlp = layers.linear_forward(p("mlp.c_proj.weight"), p("mlp.c_proj.bias"), h)
    out += a
    return out, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mlp)


def block_backward(grads, prefix, cache, dout):
    """dout (B,T,C) -> dx (B,T,C); writes this block's parameter gradients into `grads`."""
    c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mlp = cache

    def g(*names):
        return {key: grads[prefix + name] for key, name in zip(("weight", "bias"), names)}

    dh, _ = layers.linear_backward(c_mlp, dout, g("mlp.c_proj.weight", "mlp.c_proj.bias"))
    dh, _ = layers.gelu_backward(c_gelu, dh)
    dh, _ = layers.linear_backward(c_fc, dh, g("mlp.c_fc.weight", "mlp.c_fc.bias"))
    da, _ = layers.layernorm_backward(c_ln2, dh, g("ln_2.weight", "ln_2.bias"))
    da += dout  # residual
    dh, _ = layers.linear_backward(c_proj, da, g("attn.c_proj.weight", "attn.c_proj.bias"))
    dh, _ = layers.attention_backward(c_att, dh)
    dh, _ = layers.linear_backward(c_qkv, dh, g("attn.c_attn.weight", "attn.c_attn.bias"))
    dx, _ = layers.layernorm_backward(c_ln1, dh, g("ln_1.weight", "ln_1.bias"))
    dx += da
    return dx


def head_forward(params, x, targets):
    """(B,T,C), (B,T) -> scalar loss: final LayerNorm, tied LM head, mean cross-entropy."""
    B, T, C = x.shape
    h, c_lnf = layers.layernorm_forward(params["ln_f.weight"], params["ln_f.bias"], x)
    h2 = h.reshape(B * T, C)
    logits_t = params["wte"] @ h2.T  # (V, B*T), class-major
    loss, c_loss = layers.softmax_cross_entropy_forward(logits_t, targets.reshape(-1))
    return loss, (c_lnf, h2, c_loss, params["wte"], x.shape)


def head_backward(grads, cache, dloss=1.0):
    """-> dx (B,T,C); overwrites grads['wte'] with the head's share (the embedding adds its own)."""
    c_lnf, h2, c_loss, wte, x_shape = cache
    xp = array_module(h2)
    dlogits_t, _ = layers.softmax_cross_entropy_backward(c_loss, dloss)  # (V, B*T)
    xp.matmul(dlogits_t, h2, out=grads["wte"])
    dh = dlogits_t.T @ wte  # (B*T, C)
    dx, _ = layers.layernorm_backward(c_lnf, dh.reshape(x_shape),
                                      {"weight": grads["ln_f.weight"], "bias": grads["ln_f.bias"]})
    return dx


def forward(params, cfg: GPTConfig, idx, targets, mask=None):
    """(B,T) ids, (B,T) targets -> (mean loss over B*T tokens, cache for backward)."""
    xp = array_module(params["wte"])
    T = idx.shape[1]
    if T > cfg.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
    if mask is None:
        mask = layers.causal_mask(xp, T, params["wte"].dtype)
    x, c_emb = layers.embedding_forward(params["wte"], params["wpe"], idx)
    block_caches = []
    for i in range(cfg.n_layer):
        x, c = block_forward(params, f"h.{i}.", x, cfg.n_head, mask)
        block_caches.append(c)
    loss, c_head = head_forward(params, x, targets)
    return loss, (c_emb, block_caches, c_head)


def backward(cache, grads, dloss=1.0, on_ready=None):
    """Fills `grads` (a FlatParams or name -> array mapping) with d(dloss * loss)/d(param).

    `on_ready(names)`, if given, is called as soon as those gradients are final (head norm,
    then each block from the last, then the embeddings with the tied wte): the data-parallel
    reducer starts communicating them while backward goes on."""
    notify = on_ready or (lambda names: None)
    c_emb, block_caches, c_head = cache
    dx = head_backward(grads, c_head, dloss)
    notify(HEAD_PARAMS)
    for i in reversed(range(len(block_caches))):
        dx = block_backward(grads, f"h.{i}.", block_caches[i], dx)
        notify(block_param_names(i))
    layers.embedding_backward(c_emb, dx, {"wte": grads["wte"], "wpe": grads["wpe"]})
    notify(EMBEDDING_PARAMS)
    return grads


def logits(params, cfg: GPTConfig, idx):
    """(B,T) ids -> (B,V) logits for the next token after each sequence (for sampling)."""
    x, _ = layers.embedding_forward(params["wte"], params["wpe"], idx)
    mask = layers.causal_mask(array_module(x), idx.shape[1], x.dtype)
    for i in range(cfg.n_layer):
        x, _ = block_forward(params, f"h.{i}.", x, cfg.n_head, mask)
    h, _ = layers.layernorm_forward(params["ln_f.weight"], params["ln_f.bias"], x[:, -1])
    return h @ params["wte"].T


# --------------------------------------------------------------------------- pipeline stages


@dataclass(frozen=True)
class StageSpec:
    """One model chunk of a pipeline stage: a contiguous range of blocks, plus the
    embedding on the first chunk of the model and the final norm, head and loss on the last."""
    start: int
    stop: int
    first: bool
    last: bool


def stage_param_names(cfg: GPTConfig, specs) -> list:
    """The parameters a rank holding these chunks owns, in flat (forward) order. The tied
    wte sits with both the first chunk (embedding) and the last (head)."""
    wanted = set()
    for spec in specs:
        if spec.first:
            wanted.update(EMBEDDING_PARAMS)
        if spec.last:
            wanted.update(HEAD_PARAMS + ("wte",))
        for i in range(spec.start, spec.stop):
            wanted.update(block_param_names(i))
    return [name for name in param_shapes(cfg) if name in wanted]


def stage_forward(params, cfg: GPTConfig, spec: StageSpec, inp, targets, mask):
    """inp: (B,T) ids on the first chunk, else (B,T,C) activations -> (loss on the last
    chunk, else (B,T,C) activations to send on; cache)."""
    x, c_emb = layers.embedding_forward(params["wte"], params["wpe"], inp) if spec.first \
        else (inp, None)
    block_caches = []
    for i in range(spec.start, spec.stop):
        x, c = block_forward(params, f"h.{i}.", x, cfg.n_head, mask)
        block_caches.append(c)
    if not spec.last:
        return x, (c_emb, block_caches, None)
    loss, c_head = head_forward(params, x, targets)
    return loss, (c_emb, block_caches, c_head)


def stage_backward(spec: StageSpec, cache, grads, upstream):
    """upstream: dloss (a number) on the last chunk, else d(activations) (B,T,C).
    Overwrites this chunk's gradients in `grads`; returns d(input activations), or None
    on the first chunk."""
    c_emb, block_caches, c_head = cache
    dx = head_backward(grads, c_head, upstream) if spec.last else upstream
    for i, c in zip(reversed(range(spec.start, spec.stop)), reversed(block_caches)):
        dx = block_backward(grads, f"h.{i}.", c, dx)
    if not spec.first:
        return dx
    if not spec.last:
        grads["wte"][...] = 0  # no head here: the embedding's share is all of it
    layers.embedding_backward(c_emb, dx, {"wte": grads["wte"], "wpe": grads["wpe"]})
    return None


def init_stage_params(cfg: GPTConfig, seed: int, names, xp=np, dtype=np.float32):
    """The listed parameters, with exactly the values `init_params` gives the whole model
    (drawn in full on the host, so every layout starts from the same numbers)."""
    full = init_params(cfg, seed, np, np.float64)
    shapes = param_shapes(cfg)
    part = FlatParams({name: shapes[name] for name in names}, np, np.float64)
    for name in names:
        part[name][...] = full[name]
    return FlatParams(part.shapes, xp, dtype, buffer=xp.asarray(part.flat, dtype=dtype))
