"""The whole model seen from a rank that holds a piece of it: gathering the logical
parameters, checking data-parallel replicas, and deciding which tensors a rank writes to a
checkpoint, so that files always hold each logical tensor once under its GPT-2 name.
"""
import zlib

import numpy as np

from comm import watchdog
from comm.backend import to_host
from models import gpt, sharding


def unshard(name, parts, cfg, tp):
    """The logical tensor `name` from every tensor-parallel rank's local share, in rank
    order (a replicated tensor is rank 0's; wte's padding rows are dropped)."""
    if sharding.tp_pieces(name, cfg, tp, 0) is None:
        return parts[0]
    full = np.empty(gpt.param_shapes(cfg)[name], parts[0].dtype)
    for rank, part in enumerate(parts):
        for here, there in sharding.piece_indices(sharding.tp_pieces(name, cfg, tp, rank),
                                                  full.ndim):
            full[there] = part[here]
    return full


def gather_full_params(engine, xp):
    """Every stage's and tensor-parallel rank's parameters put together, on every rank (for
    validation, sampling and saving params.h5)."""
    params, comms, cfg = engine.current_params(), engine.comms, engine.cfg
    if comms.pp is None and comms.tp is None:
        return params
    dtype = params.flat.dtype
    local = {name: to_host(v) for name, v in params.items()}
    if comms.tp is not None:
        with watchdog.waiting("the other tensor-parallel ranks' parameters"):
            parts = comms.tp.allgather(local)
        local = {name: unshard(name, [part[name] for part in parts], cfg, engine.tp_size)
                 for name in local}
    full = gpt.FlatParams(gpt.param_shapes(cfg), np, dtype)
    stages = [local]
    if comms.pp is not None:
        with watchdog.waiting("the other pipeline stages' parameters"):
            stages = comms.pp.allgather(local)
    for stage in stages:
        for name, value in stage.items():
            full[name][...] = value
    return gpt.FlatParams(full.shapes, xp, dtype, buffer=xp.asarray(full.flat))


def params_digest(params) -> int:
    """A cheap fingerprint of all parameters (CRC-32 of their bytes)."""
    return zlib.crc32(np.ascontiguousarray(to_host(params.flat)).view(np.uint8))


def check_replicas_agree(params, dp_comm, step):
    """Fails loudly, on every rank at once, if data-parallel replicas have drifted apart."""
    with watchdog.waiting(f"the other ranks' parameter digests at step {step}"):
        digests = dp_comm.allgather(params_digest(params))
    if len(set(digests)) > 1:
        raise RuntimeError(f"parameters differ across data-parallel ranks at step {step}: "
                           f"CRC-32 per rank {[hex(d) for d in digests]}")


def checkpoint_names(engine, zero: bool, dp_rank: int):
    """(tensors whose values this rank writes, tensors whose AdamW moments it writes):
    data-parallel replicas write once (dp rank 0; under ZeRO-1 each rank its own moments),
    replicated tensors once per tensor-parallel group (tp rank 0), the tied wte once (the
    first stage)."""
    names = [name for name in engine.params.shapes
             if not (name == "wte" and engine.stage > 0)
             and not (engine.tp_rank > 0
                      and sharding.tp_pieces(name, engine.cfg, engine.tp_size, 0) is None)]
    first_replica = dp_rank == 0
    return (names if first_replica else []), (names if zero or first_replica else [])


def placement(engine):
    """name -> where this rank's local tensor sits in the logical one (sharding.tp_pieces)."""
    return {name: sharding.tp_pieces(name, engine.cfg, engine.tp_size, engine.tp_rank)
            for name in engine.params.shapes}
