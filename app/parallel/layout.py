"""Every layout rule in one place: the dp x pp x tp grid, the batch divisibility, the
pipeline partition and the tensor-parallel divisibility.

`check_config(cfg)` holds the rules that need no world size (config validation calls it);
`plan(cfg, world)` adds the ones that do and returns the `Layout` every rank computes alike,
so every rank raises the same UserError and exits instead of waiting in a collective.
"""
from dataclasses import dataclass

import numpy as np

from app.errors import UserError
from app.parallel.partition import (balanced, format_partition, model_costs, stage_costs,
                                    uniform)


@dataclass(frozen=True)
class Layout:
    world: int
    dp: int
    pp: int
    tp: int
    micro_batches: int
    rows: int             # sequences per micro-batch on one data-parallel rank
    schedule: str         # 1f1b, gpipe or interleaved (one stage: 1f1b, the plain loop)
    chunks: int           # model chunks per stage
    ranges: tuple         # (start, stop) blocks per virtual stage
    partition: str        # how `ranges` was chosen, for the start-up line
    sequence_parallel: bool
    recompute: str
    zero: bool
    mode: str = "ring"    # or "ps": ranks 0..servers-1 serve, the others are workers
    servers: int = 0

    @property
    def logger(self) -> int:
        """The rank that logs and writes metrics.jsonl and params.h5: rank 0, or in ps mode
        the first worker (servers do not run the training loop)."""
        return self.servers

    def describe(self) -> str:
        text = f"dp={self.dp} pp={self.pp} tp={self.tp} micro_batches={self.micro_batches}"
        if self.pp > 1:
            text += f" schedule={self.schedule} chunks={self.chunks}"
        if self.tp > 1:
            text += f" sequence_parallel={'on' if self.sequence_parallel else 'off'}"
        text += f" recompute={self.recompute} zero={int(self.zero)}"
        if self.mode == "ps":
            text = f"mode=ps servers={self.servers} workers={self.dp}: " + text
        return text


def parse_straggler(text: str):
    """"RANK:DELAY_MS" -> (rank, seconds); "any:DELAY_MS" -> (None, seconds): a rotating
    straggler, one model rank drawn afresh each step; "" -> None. ValueError names a bad
    value."""
    if not text:
        return None
    try:
        rank, delay = text.split(":")
        rank, delay = (None if rank == "any" else int(rank)), float(delay)
    except ValueError:
        raise ValueError(f"straggler {text!r}: expected RANK:DELAY_MS or any:DELAY_MS, "
                         "e.g. 2:50") from None
    if rank is not None and rank < 0 or not delay >= 0:
        raise ValueError(f"straggler {text!r}: expected a rank >= 0 and a delay >= 0 ms")
    return rank, delay / 1e3


def straggler_delay(straggler, step: int, rank: int, servers: int, world: int,
                    seed: int) -> float:
    """Seconds that world rank `rank` sleeps at `step`: the fixed straggler every step, or
    the rotating one when (seed, step) draws it among the model ranks (servers are never
    drawn), which every rank computes alike without a message."""
    if straggler is None:
        return 0.0
    chosen, seconds = straggler
    if chosen is None:
        chosen = servers + int(np.random.default_rng([seed, step]).integers(world - servers))
    return seconds if chosen == rank else 0.0


def _bad(message):
    raise UserError(message)


def check_config(cfg):
    """The rules that hold whatever the world size; UserError naming the bad value."""
    if cfg.chunks > 1 and cfg.pp == 1:
        _bad(f"config chunks = {cfg.chunks} needs pp > 1: expected chunks = 1 without a "
             "pipeline")
    if cfg.chunks > 1 and cfg.schedule != "interleaved":
        _bad(f"config chunks = {cfg.chunks} needs schedule = \"interleaved\", not "
             f"{cfg.schedule!r}: expected chunks = 1 for gpipe and 1f1b")
    if cfg.pp * cfg.chunks > cfg.n_layer:
        _bad(f"config pp * chunks = {cfg.pp} * {cfg.chunks} exceeds n_layer = {cfg.n_layer}: "
             "expected at least one block per (virtual) stage")
    if cfg.schedule == "interleaved" and cfg.chunks > 1:
        if cfg.n_layer % (cfg.pp * cfg.chunks):
            _bad(f"config n_layer = {cfg.n_layer} is not divisible by pp * chunks = "
                 f"{cfg.pp} * {cfg.chunks}: interleaving needs equal chunks")
        if cfg.micro_batches % cfg.pp:
            _bad(f"config micro_batches = {cfg.micro_batches} is not a multiple of pp = "
                 f"{cfg.pp}: the interleaved schedule needs one")
    if cfg.n_head % cfg.tp:
        _bad(f"config n_head = {cfg.n_head} is not divisible by tp = {cfg.tp}: expected whole "
             "attention heads on every tensor-parallel rank")
    # n_embd then splits too: n_embd % n_head == 0 is a rule of the model (config.validate)
    if cfg.straggler:
        try:
            parse_straggler(cfg.straggler)
        except ValueError as err:
            _bad(f"config {err}")
    if cfg.sequence_parallel and cfg.block_size % cfg.tp:
        _bad(f"config block_size = {cfg.block_size} is not divisible by tp = {cfg.tp} with "
             "sequence_parallel: expected equal slices of the sequence")


def _check_ps(cfg, world):
    if cfg.mode != "ps":
        for key, default in (("staleness", 0), ("balance", "static")):
            if getattr(cfg, key) != default:
                _bad(f"config {key} = {getattr(cfg, key)!r} needs mode = \"ps\": expected "
                     f"{key} = {default!r} with the ring")
        return
    if cfg.servers >= world:
        _bad(f"config servers = {cfg.servers} leaves no worker on {world} ranks: expected "
             f"servers < world size")
    for key in ("pp", "tp"):
        if getattr(cfg, key) > 1:
            _bad(f"config {key} = {getattr(cfg, key)} with mode = \"ps\": expected {key} = 1 "
                 "(workers run whole models; use the ring for pipelines and tensor "
                 "parallelism)")
    if cfg.zero:
        _bad("config zero = 1 with mode = \"ps\": expected zero = 0 (the servers already "
             "shard the optimizer state)")


def plan(cfg, world: int) -> Layout:
    """The layout of `cfg` on `world` ranks (dp = 0 in the config: all that pp and tp leave;
    in ps mode the workers are the data-parallel ranks)."""
    check_config(cfg)
    _check_ps(cfg, world)
    if cfg.compress != "none" and cfg.zero:
        _bad(f"config compress = {cfg.compress!r} with zero = 1: expected compress = \"none\" "
             "under ZeRO-1 (compressed reductions are all-reduces)")
    if cfg.straggler:
        rank = parse_straggler(cfg.straggler)[0]
        if rank is not None and rank >= world:
            _bad(f"config straggler = {cfg.straggler!r}: rank {rank} does not exist; expected "
                 f"a rank below the world size {world}")
    servers = cfg.servers if cfg.mode == "ps" else 0
    if servers and cfg.dp and cfg.dp != world - servers:
        _bad(f"config dp = {cfg.dp} with {servers} servers on {world} ranks: expected dp = 0 "
             f"or {world - servers} (the workers)")
    grid = world - servers  # the ranks that run the model: the workers in ps mode
    dp = cfg.dp or max(1, grid // (cfg.pp * cfg.tp))
    if dp * cfg.pp * cfg.tp != grid:
        _bad(f"world size {world} != dp*pp*tp = {dp}*{cfg.pp}*{cfg.tp} = "
             f"{dp * cfg.pp * cfg.tp}: expected the ranks to fill the grid exactly")
    rows, rem = divmod(cfg.batch_size, dp * cfg.micro_batches)
    if rem or rows == 0:
        _bad(f"config batch_size = {cfg.batch_size} is not divisible by dp * micro_batches = "
             f"{dp} * {cfg.micro_batches}: expected a multiple of {dp * cfg.micro_batches}")
    ranges, partition = pipeline_ranges(cfg, rows)
    return Layout(world, dp, cfg.pp, cfg.tp, cfg.micro_batches, rows,
                  cfg.schedule if cfg.pp > 1 else "1f1b", cfg.chunks if cfg.pp > 1 else 1,
                  tuple(ranges), partition, cfg.sequence_parallel and cfg.tp > 1,
                  cfg.recompute, bool(cfg.zero), cfg.mode, servers)


def pipeline_ranges(cfg, rows_per_micro_batch: int):
    """Block ranges per (virtual) stage and a printable description of the split."""
    if cfg.pp == 1:
        return [(0, cfg.n_layer)], "one stage"
    model_cfg = cfg.model_config()
    embedding, blocks, head = model_costs(model_cfg, rows_per_micro_batch * cfg.block_size)
    if cfg.chunks > 1:  # interleaving needs equal chunks, whatever `partition` says
        ranges = uniform(cfg.n_layer, cfg.pp * cfg.chunks)
        per_stage = cfg.n_layer // len(ranges)
        return ranges, (f"partition=uniform (interleaving needs equal chunks): {len(ranges)} "
                        f"virtual stages of {per_stage} block{'s' * (per_stage > 1)}")
    if cfg.partition == "uniform":
        ranges = uniform(cfg.n_layer, cfg.pp)
    else:
        ranges = balanced(blocks, cfg.pp, embedding, head)
    return ranges, (f"partition={cfg.partition}: "
                    + format_partition(ranges, stage_costs(ranges, blocks, embedding, head)))
