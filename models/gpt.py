"""GPT-2 style decoder: configuration, parameter naming, initialisation, forward and backward.

Parameters are a flat name -> array mapping with GPT-2's names and full logical shapes
(`wte`, `wpe`, `h.{i}.ln_1.weight`, `h.{i}.attn.c_attn.weight`, ..., `ln_f.bias`). All of them
are views into one contiguous buffer (`FlatParams`), so the optimizer, gradient clipping and
(later) gradient all-reduce each work on a single array instead of dozens of small ones.

The LM head is tied to `wte`: logits = x @ wte.T, and wte's gradient is the sum of the
head's and the embedding's contributions. With `n_classes` > 0 the head is a classifier
instead (models/classifier.py: `cls.weight`, `cls.bias` on the final norm's output), and
wte belongs to the embedding alone.
"""
from dataclasses import dataclass

import numpy as np

from comm.backend import array_module
from models import classifier, gemm, layers, parallel


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = 256
    n_classes: int = 0  # 0: the language model; K > 0: a K-way sequence classifier
    pool: str = "last"  # the classifier's pooling (models/classifier.py)


EMBEDDING_PARAMS = ("wte", "wpe")
HEAD_PARAMS = ("ln_f.weight", "ln_f.bias")  # plus the tied wte, or the classifier's
CLASSIFIER_PARAMS = ("cls.weight", "cls.bias")


def head_param_names(cfg: GPTConfig) -> tuple:
    """The last chunk's own parameters (the tied wte aside)."""
    return HEAD_PARAMS + (CLASSIFIER_PARAMS if cfg.n_classes else ())


def ties_wte(cfg: GPTConfig) -> bool:
    """Whether the head reuses wte: the language model's does, a classifier's does not."""
    return cfg.n_classes == 0


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
    """Name -> shape for every parameter, in forward order (embedding, blocks, final norm,
    classifier)."""
    C = cfg.n_embd
    shapes = {"wte": (cfg.vocab_size, C), "wpe": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{suffix}": shape for suffix, shape in block_shapes(C).items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    if cfg.n_classes:
        shapes.update({"cls.weight": (C, cfg.n_classes), "cls.bias": (cfg.n_classes,)})
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

    def like(self, dtype=None):
        """A zeroed FlatParams of the same layout (for gradients or optimizer moments), of
        this one's dtype unless another is given."""
        return FlatParams(self.shapes, array_module(self.flat), dtype or self.flat.dtype)

    def __getitem__(self, name):
        return self.views[name]

    def __iter__(self):
        return iter(self.views)

    def items(self):
        return self.views.items()


def init_params(cfg: GPTConfig, seed: int, xp=np, dtype=np.float32) -> FlatParams:
    """GPT-2 initialisation: N(0, 0.02) matrices and embeddings, residual projections scaled
    by 1/sqrt(2 n_layer), zero biases, unit LayerNorm gains; a zero classifier (uniform
    predictions: a pre-trained trunk gets no noise from a random head). Drawn on the host in
    float64 so that every device and dtype starts from the same numbers."""
    rng = np.random.default_rng(seed)
    host = FlatParams(param_shapes(cfg), np, np.float64)
    residual_std = 0.02 / np.sqrt(2 * cfg.n_layer)
    for name, view in host.items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            view[...] = 1.0
        elif name.endswith(".bias") or name == "cls.weight":
            view[...] = 0.0
        elif name.endswith("c_proj.weight"):
            view[...] = rng.normal(0.0, residual_std, view.shape)
        else:
            view[...] = rng.normal(0.0, 0.02, view.shape)
    return FlatParams(host.shapes, xp, dtype, buffer=xp.asarray(host.flat, dtype=dtype))


UNSPLIT = parallel.TensorParallel()


# --------------------------------------------------------------------------- forward/backward
#
# One stage pair, `stage_forward`/`stage_backward`, is the only loop over blocks: the whole
# model is the stage that is both first and last (`forward`, `backward`, `logits`).


def _linear_forward(kind, weight, bias, x, tp):
    """kind "column" or "row": the plain linear when unsplit, else the parallel one."""
    if tp.size == 1:
        return layers.linear_forward(weight, bias, x)
    forward = getattr(parallel, f"{kind}_linear_forward")
    return forward(weight, bias, x, tp.group, tp.sequence_parallel)


def _linear_backward(kind, tp, cache, dy, grads):
    backward = layers.linear_backward if tp.size == 1 else \
        getattr(parallel, f"{kind}_linear_backward")
    return backward(cache, dy, grads)[0]


def _linear_gelu_forward(weight, bias, x, tp):
    """The MLP's first half, gelu(x W + b): one layer pair, column-parallel when split."""
    if tp.size == 1:
        return layers.linear_gelu_forward(weight, bias, x)
    return parallel.column_linear_gelu_forward(weight, bias, x, tp.group, tp.sequence_parallel)


def _linear_gelu_backward(tp, cache, dy, grads):
    backward = layers.linear_gelu_backward if tp.size == 1 else \
        parallel.column_linear_gelu_backward
    return backward(cache, dy, grads)[0]


# Replicated parameters whose gradient each rank computes from its slice of the sequence only
# (sequence parallelism): summed over the tensor-parallel group before anyone reads them.
SEQUENCE_PARTIAL = ("ln_1.weight", "ln_1.bias", "attn.c_proj.bias", "ln_2.weight",
                    "ln_2.bias", "mlp.c_proj.bias")


def _sum_partial_grads(tp, tensors):
    """All-reduce these small gradients over the group in one message (packed, summed,
    unpacked)."""
    if not tp.sequence_parallel or tp.size == 1:
        return
    xp = array_module(tensors[0])
    packed = xp.concatenate([t.reshape(-1) for t in tensors])
    tp.group.all_reduce(packed)
    at = 0
    for t in tensors:
        t[...] = packed[at:at + t.size].reshape(t.shape)
        at += t.size


def block_forward(params, prefix, x, n_head, mask, tp=UNSPLIT, recompute="none"):
    """(B,T,C) -> (B,T,C): x + attn(ln_1(x)), then + mlp(ln_2(.)); (B,T/tp,C) in and out
    under sequence parallelism, each rank computing n_head/tp heads and 4C/tp MLP columns.

    recompute: "full" keeps only x and runs the block again in backward; "selective" drops
    the attention core's scores and softmax (most of the activation bytes, few of the
    FLOPs) and recomputes them from q|k|v."""
    p = lambda name: params[prefix + name]  # noqa: E731
    h, c_ln1 = layers.layernorm_forward(p("ln_1.weight"), p("ln_1.bias"), x)
    qkv, c_qkv = _linear_forward("column", p("attn.c_attn.weight"), p("attn.c_attn.bias"), h, tp)
    a, c_att = layers.attention_forward(qkv, n_head // tp.size, mask)
    if recompute == "selective":
        c_att = ("recompute", qkv, n_head // tp.size, mask)
    a, c_proj = _linear_forward("row", p("attn.c_proj.weight"), p("attn.c_proj.bias"), a, tp)
    layers.add_into(a, x)  # residual, in place in the fresh projection output
    h, c_ln2 = layers.layernorm_forward(p("ln_2.weight"), p("ln_2.bias"), a)
    h, c_fc = _linear_gelu_forward(p("mlp.c_fc.weight"), p("mlp.c_fc.bias"), h, tp)
    out, c_mlp = _linear_forward("row", p("mlp.c_proj.weight"), p("mlp.c_proj.bias"), h, tp)
    layers.add_into(out, a)
    if recompute == "full":
        return out, ("recompute", params, prefix, x, n_head, mask, tp)
    return out, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_mlp, tp)


def block_backward(grads, prefix, cache, dout):
    """dout (B,T,C) -> dx (B,T,C); writes this block's parameter gradients into `grads`."""
    if isinstance(cache[0], str):  # full recomputation: the forward again, now with caches
        _, params, prefix, x, n_head, mask, tp = cache
        cache = block_forward(params, prefix, x, n_head, mask, tp)[1]
    c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_mlp, tp = cache
    if isinstance(c_att[0], str) and c_att[0] == "recompute":  # selective: the core again
        _, qkv, heads, mask = c_att
        c_att = layers.attention_forward(qkv, heads, mask)[1]

    def g(*names):
        return {key: grads[prefix + name] for key, name in zip(("weight", "bias"), names)}

    dh = _linear_backward("row", tp, c_mlp, dout, g("mlp.c_proj.weight", "mlp.c_proj.bias"))
    dh = _linear_gelu_backward(tp, c_fc, dh, g("mlp.c_fc.weight", "mlp.c_fc.bias"))
    da, _ = layers.layernorm_backward(c_ln2, dh, g("ln_2.weight", "ln_2.bias"))
    layers.add_into(da, dout)  # residual
    dh = _linear_backward("row", tp, c_proj, da, g("attn.c_proj.weight", "attn.c_proj.bias"))
    dh, _ = layers.attention_backward(c_att, dh)
    dh = _linear_backward("column", tp, c_qkv, dh, g("attn.c_attn.weight", "attn.c_attn.bias"))
    dx, _ = layers.layernorm_backward(c_ln1, dh, g("ln_1.weight", "ln_1.bias"))
    layers.add_into(dx, da)
    _sum_partial_grads(tp, [grads[prefix + name] for name in SEQUENCE_PARTIAL])
    return dx


def embed_forward(params, idx, tp=UNSPLIT, vocab_start=0):
    """(B,T) ids -> (B,T,C) token plus position embeddings ((B,T/tp,C) under sequence
    parallelism); wte may be a vocabulary shard starting at row `vocab_start`."""
    if tp.size == 1:
        return layers.embedding_forward(params["wte"], params["wpe"], idx)
    x, c_tok = parallel.vocab_embedding_forward(params["wte"], vocab_start, idx, tp.group,
                                                tp.sequence_parallel)
    T, T_local = idx.shape[1], x.shape[1]
    start = tp.group.rank * T_local if tp.sequence_parallel else 0
    x += params["wpe"][start:start + T_local]
    return x, (c_tok, start, T, tp)


def embed_backward(grads, cache, dx):
    """Adds the token embedding's share into grads['wte'] and writes grads['wpe']."""
    if len(cache) == 3:  # unsplit
        layers.embedding_backward(cache, dx, {"wte": grads["wte"], "wpe": grads["wpe"]})
        return
    c_tok, start, T, tp = cache
    parallel.vocab_embedding_backward(c_tok, dx, {"wte": grads["wte"]})
    dwpe = grads["wpe"]
    dwpe[...] = 0
    dx.sum(axis=0, out=dwpe[start:start + dx.shape[1]])
    if tp.sequence_parallel:  # each rank saw its positions only
        tp.group.all_reduce(dwpe.reshape(-1))


def head_forward(params, cfg: GPTConfig, x, targets, tp=UNSPLIT, vocab_start=0):
    """(B,T,C) -> scalar loss: the final LayerNorm, then the tied LM head's mean
    cross-entropy over (B,T) next-token `targets`, or the classifier's over `targets`, a
    classifier.ClassTargets."""
    h, c_lnf = layers.layernorm_forward(params["ln_f.weight"], params["ln_f.bias"], x)
    if cfg.n_classes:
        loss, c_out = classifier.head_forward(params["cls.weight"], params["cls.bias"], h,
                                              targets, cfg.pool, tp)
        return loss, (c_lnf, True, c_out, tp)
    loss, c_out = _lm_loss_forward(params["wte"], h, targets, tp, vocab_start, cfg.vocab_size)
    return loss, (c_lnf, False, c_out, tp)


def head_backward(grads, cache, dloss=1.0):
    """-> dx (B,T,C); overwrites the head's gradients (the LM head's share of the tied wte:
    the embedding adds its own)."""
    c_lnf, classify, c_out, tp = cache
    if classify:
        dh = classifier.head_backward(c_out, dloss, {"weight": grads["cls.weight"],
                                                     "bias": grads["cls.bias"]})
    else:
        dh = _lm_loss_backward(grads, c_out, dloss)
    dx, _ = layers.layernorm_backward(c_lnf, dh,
                                      {"weight": grads["ln_f.weight"], "bias": grads["ln_f.bias"]})
    _sum_partial_grads(tp, [grads["ln_f.weight"], grads["ln_f.bias"]])
    return dx


def _lm_loss_forward(wte, h, targets, tp, vocab_start, vocab_size):
    """Normed (B,T,C), (B,T) ids -> mean next-token cross-entropy of the tied head. Split by
    vocabulary under tensor parallelism: no rank ever holds all the logits."""
    c_in = None
    if tp.size > 1:
        h, c_in = (parallel.gather_sequence_forward if tp.sequence_parallel
                   else parallel.copy_forward)(h, tp.group)
    B, T, C = h.shape
    h2 = h.reshape(B * T, C)
    if tp.size == 1:
        loss, c_loss = layers.lm_loss_forward(wte, h2, targets.reshape(-1))
    else:
        logits_t = gemm.matmul(wte, h2.T)  # (V, B*T), class-major
        loss, c_loss = parallel.vocab_cross_entropy_forward(
            logits_t, targets.reshape(-1), vocab_start, vocab_size, tp.group)
    return loss, (h2, c_loss, wte, (B, T, C), tp, c_in)


def _lm_loss_backward(grads, cache, dloss):
    """-> d(normed hidden state); overwrites grads['wte'] with the head's share."""
    h2, c_loss, wte, h_shape, tp, c_in = cache
    if tp.size == 1:
        dh, _ = layers.lm_loss_backward(c_loss, dloss, {"wte": grads["wte"]})
        return dh.reshape(h_shape)
    dlogits_t, _ = parallel.vocab_cross_entropy_backward(c_loss, dloss)
    gemm.matmul(dlogits_t, h2, out=grads["wte"])
    dh = gemm.matmul(dlogits_t.T, wte).reshape(h_shape)  # (B*T, C): a partial sum under tp
    if tp.size > 1:
        dh, _ = (parallel.gather_sequence_backward if tp.sequence_parallel
                 else parallel.copy_backward)(c_in, dh)
    return dh


@dataclass(frozen=True)
class StageSpec:
    """One model chunk of a pipeline stage: a contiguous range of blocks, plus the
    embedding on the first chunk of the model and the final norm, head and loss on the last.
    The whole model is StageSpec(0, n_layer, first=True, last=True)."""
    start: int
    stop: int
    first: bool
    last: bool


def whole_model(cfg: GPTConfig) -> StageSpec:
    return StageSpec(0, cfg.n_layer, first=True, last=True)


def stage_param_names(cfg: GPTConfig, specs) -> list:
    """The parameters a rank holding these chunks owns, in flat (forward) order. The tied
    wte sits with both the first chunk (embedding) and the last (LM head)."""
    wanted = set()
    for spec in specs:
        if spec.first:
            wanted.update(EMBEDDING_PARAMS)
        if spec.last:
            wanted.update(head_param_names(cfg) + (("wte",) if ties_wte(cfg) else ()))
        for i in range(spec.start, spec.stop):
            wanted.update(block_param_names(i))
    return [name for name in param_shapes(cfg) if name in wanted]


def stage_forward(params, cfg: GPTConfig, spec: StageSpec, inp, targets, mask,
                  tp=UNSPLIT, recompute="none"):
    """inp: (B,T) ids on the first chunk, else (B,T,C) activations -> (loss on the last
    chunk, else (B,T,C) activations to send on; cache). (B,T/tp,C) activations under
    sequence parallelism."""
    vocab_start = parallel.vocab_shard(cfg.vocab_size, tp.size, tp.group.rank)[1]
    x, c_emb = embed_forward(params, inp, tp, vocab_start) if spec.first else (inp, None)
    block_caches = []
    for i in range(spec.start, spec.stop):
        x, c = block_forward(params, f"h.{i}.", x, cfg.n_head, mask, tp, recompute)
        block_caches.append(c)
    if not spec.last:
        return x, (c_emb, block_caches, None, spec, cfg)
    loss, c_head = head_forward(params, cfg, x, targets, tp, vocab_start)
    return loss, (c_emb, block_caches, c_head, spec, cfg)


def stage_backward(spec: StageSpec, cache, grads, upstream, on_ready=None):
    """upstream: dloss (a number) on the last chunk, else d(activations). Overwrites this
    chunk's gradients in `grads`; returns d(input activations), or None on the first chunk.

    `on_ready(names)`, if given, is called as soon as those gradients are final (the head's
    norm and classifier, then each block from the last, then the embeddings; the tied wte
    once: with the embedding on a first chunk, else after the head): the data-parallel
    reducer starts communicating them while backward goes on."""
    notify = on_ready or (lambda names: None)
    c_emb, block_caches, c_head, _, cfg = cache
    tied_head = spec.last and ties_wte(cfg)
    dx = upstream
    if spec.last:
        dx = head_backward(grads, c_head, upstream)
        notify(head_param_names(cfg) + (("wte",) if tied_head and not spec.first else ()))
    for i, c in zip(reversed(range(spec.start, spec.stop)), reversed(block_caches)):
        dx = block_backward(grads, f"h.{i}.", c, dx)
        notify(block_param_names(i))
    if not spec.first:
        return dx
    if not tied_head:
        grads["wte"][...] = 0  # no head's share here: the embedding's is all of it
    embed_backward(grads, c_emb, dx)
    notify(EMBEDDING_PARAMS)
    return None


def forward(params, cfg: GPTConfig, idx, targets, mask=None):
    """(B,T) ids, (B,T) next-token targets (a classifier: ClassTargets) -> (mean loss over
    the B*T tokens (B rows), cache for backward)."""
    T = idx.shape[1]
    if T > cfg.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
    if mask is None:
        mask = layers.causal_mask(array_module(params["wte"]), T, params["wte"].dtype)
    return stage_forward(params, cfg, whole_model(cfg), idx, targets, mask)


def backward(cache, grads, dloss=1.0, on_ready=None):
    """Fills `grads` (a FlatParams or name -> array mapping) with d(dloss * loss)/d(param),
    announcing finished gradients to `on_ready` (see `stage_backward`)."""
    stage_backward(cache[3], cache, grads, dloss, on_ready)
    return grads


def logits(params, cfg: GPTConfig, idx, lengths=None):
    """(B,T) ids -> (B,V) logits for the next token after each sequence (for sampling); a
    classifier's: (B,T) ids, (B,) real lengths -> (B,K) class logits."""
    mask = layers.causal_mask(array_module(params["wte"]), idx.shape[1], params["wte"].dtype)
    trunk = StageSpec(0, cfg.n_layer, first=True, last=False)  # all blocks, no loss
    x, _ = stage_forward(params, cfg, trunk, idx, None, mask)
    if cfg.n_classes:
        h, _ = layers.layernorm_forward(params["ln_f.weight"], params["ln_f.bias"], x)
        return classifier.logits_forward(params["cls.weight"], params["cls.bias"], h, lengths,
                                         cfg.pool)[0]
    h, _ = layers.layernorm_forward(params["ln_f.weight"], params["ln_f.bias"], x[:, -1])
    return h @ params["wte"].T
