"""Where a tensor-parallel rank's share of each GPT parameter sits in the logical tensor.

Files, checkpoints and exports hold logical tensors under their GPT-2 names; a rank of a
tensor-parallel group of tp holds a slice of some of them along one axis. `tp_pieces` is
the one description of those slices (the layers of models/parallel.py and the block code of
models/gpt.py compute with exactly these slices); `shard` cuts them, app/parallel/state.py
and the checkpoints put them back.
"""
import numpy as np

from comm.backend import array_module
from models import parallel
from models.gpt import FlatParams, GPTConfig, init_params, param_shapes


def padded_vocab(cfg: GPTConfig, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so that wte splits into equal row
    shards; the padded rows stay zero and never reach the loss (models/parallel.py)."""
    return parallel.vocab_shard(cfg.vocab_size, tp, 0)[0]


def tp_pieces(name: str, cfg: GPTConfig, tp: int, rank: int):
    """Where tensor-parallel rank `rank`'s local `name` sits in the logical tensor: None when
    it is replicated, else (axis, [(local start, global start, length), ...]) along that
    axis. Rows of wte beyond vocab_size (padding) belong to no piece."""
    if tp == 1:
        return None
    C = cfg.n_embd
    suffix = name.split(".", 2)[-1] if name.startswith("h.") else name
    columns = 1 if name.endswith("weight") else 0  # the output features' axis
    if name == "wte":
        _, lo, hi = parallel.vocab_shard(cfg.vocab_size, tp, rank)
        length = min(hi, cfg.vocab_size) - lo
        return 0, [(0, lo, length)] if length > 0 else []
    if suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
        w = C // tp  # whole heads: rank r's columns of q, of k and of v
        return columns, [(j * w, j * C + rank * w, w) for j in range(3)]
    if suffix in ("mlp.c_fc.weight", "mlp.c_fc.bias"):
        w = 4 * C // tp
        return columns, [(0, rank * w, w)]
    if suffix in ("attn.c_proj.weight", "mlp.c_proj.weight"):
        rows = (C if suffix.startswith("attn") else 4 * C) // tp
        return 0, [(0, rank * rows, rows)]
    return None  # LayerNorms, row-parallel biases, wpe: replicated


def local_shape(name: str, shape, cfg: GPTConfig, tp: int) -> tuple:
    """The shape of a tensor-parallel rank's share of `name` (logical `shape`)."""
    if name == "wte" and tp > 1:
        return (padded_vocab(cfg, tp) // tp, shape[1])
    placed = tp_pieces(name, cfg, tp, 0)
    if placed is None:
        return tuple(shape)
    axis, pieces = placed
    local = list(shape)
    local[axis] = sum(length for _, _, length in pieces)
    return tuple(local)


def shard(name: str, full, cfg: GPTConfig, tp: int, rank: int):
    """Rank `rank`'s share of the logical tensor `full` (zero in wte's padding rows)."""
    placed = tp_pieces(name, cfg, tp, rank)
    if placed is None:
        return full
    xp = array_module(full)
    out = xp.zeros(local_shape(name, full.shape, cfg, tp), full.dtype)
    for here, there in piece_indices(placed, out.ndim):
        out[here] = full[there]
    return out


def piece_indices(placed, ndim):
    """(index into the local share, index into the logical tensor) of each piece of
    `placed`, a `tp_pieces` answer."""
    axis, pieces = placed
    for local, start, length in pieces:
        here, there = [slice(None)] * ndim, [slice(None)] * ndim
        here[axis], there[axis] = slice(local, local + length), slice(start, start + length)
        yield tuple(here), tuple(there)


def init_rank_params(cfg: GPTConfig, seed: int, names, xp=np, dtype=np.float32, tp=1,
                     tp_rank=0):
    """The listed parameters (this rank's tensor-parallel shares of them), with exactly the
    values `init_params` gives the whole model: drawn in full on the host, so every layout
    starts from the same numbers."""
    full = init_params(cfg, seed, np, np.float64)
    shapes = param_shapes(cfg)
    part = FlatParams({name: local_shape(name, shapes[name], cfg, tp) for name in names},
                      np, np.float64)
    set_rank_params(part, full, cfg, tp, tp_rank)
    return FlatParams(part.shapes, xp, dtype, buffer=xp.asarray(part.flat, dtype=dtype))


def set_rank_params(params: FlatParams, full, cfg: GPTConfig, tp=1, tp_rank=0):
    """Overwrites this rank's `params` (the tensors it holds, its tensor-parallel shares of
    them) with their parts of the whole model `full` (name -> logical host array)."""
    xp = array_module(params.flat)
    for name, view in params.items():
        view[...] = xp.asarray(shard(name, full[name], cfg, tp, tp_rank), dtype=view.dtype)
