"""Parameter-server training (`--mode ps`): the app's half of comm/ps.py.

Ranks 0..S-1 are servers, the rest workers. A server holds the whole parameter vector in
host memory but owns only its contiguous shard of it, and AdamW's moments for that shard
alone (as under ZeRO-1). It applies a clock when every worker has pushed it:

    sum of the workers' shards -> the global gradient norm (the servers sum their squared
    norms in one ring all-reduce: every server clips by the same norm, the whole model's)
    -> clip -> AdamW on the shard (a non-finite loss or norm skips the clock everywhere)

A worker is the step engine without its optimizer: its program ends in `OptimizerStep`,
which here pushes the gradient and pulls the parameters for the next clock. It runs on its
slice of the global batch (`BatchLoader`, the workers as the data-parallel ranks), or, with
`--balance dynamic`, on micro-batches it takes a few at a time from server 0.
"""
import math

import numpy as np

from app import preempt
from app.checkpoint import (load_checkpoint, read_manifest, save_checkpoint, saving,
                            training_meta)
from app.parallel.engine import Comms, StepEngine
from comm import ps, ring, watchdog
from comm.compress import make_compressor
from models import gpt
from models.optim import AdamW, clip_by_global_norm, decay_mask, lr_at


class ServerState:
    """One server's parameters, shard and AdamW; `apply` is comm.ps.Server's update."""

    def __init__(self, cfg, servers_comm, params, timeout=None):
        self.cfg, self.comm, self.timeout = cfg, servers_comm, timeout
        n = params.size
        self.lo, self.hi = ps.shard_of(n, servers_comm.Get_size(), servers_comm.Get_rank())
        self.grads = np.zeros(n, params.flat.dtype)
        self.optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed, np),
                               cfg.beta1, cfg.beta2, weight_decay=cfg.weight_decay,
                               ranges=[(self.lo, self.hi)])

    def apply(self, clock, grad_shard, loss, lr_scale=1.0):
        """-> (loss, norm, skipped, lr) of the clock."""
        sums = np.array([float(np.vdot(grad_shard, grad_shard))])
        with watchdog.waiting("the other servers' gradient norms", self.timeout):
            ring.all_reduce(self.comm, sums)
        norm = math.sqrt(sums[0])
        lr = lr_scale * lr_at(clock, self.cfg.lr, self.cfg.min_lr, self.cfg.warmup_steps,
                              self.cfg.steps)
        skipped = not (math.isfinite(loss) and math.isfinite(norm))
        if not skipped:
            shard = self.grads[self.lo:self.hi]
            shard[...] = grad_shard
            clip_by_global_norm(shard, self.cfg.grad_clip, norm)
            self.optimizer.step(self.grads, lr)
        return loss, norm, float(skipped), lr


class WorkerEngine(StepEngine):
    """The step engine on one worker: forward and backward as ever, then push and pull."""

    def __init__(self, model_cfg, options, client, workers, first_clock=0, balance="static",
                 **kwargs):
        super().__init__(model_cfg, options, Comms(), data_shards=workers, local_optimizer=False,
                         **kwargs)
        self.client, self.clock = client, first_clock
        self.balance = balance
        if balance == "dynamic" and self.scratch is None:  # it may take several micro-batches
            self.scratch = self.params.like()
        self.micro_done = 0  # micro-batches this worker computed (dynamic balancing)
        client.pull(first_clock)

    def __call__(self, x, y, lr):
        """x, y: this worker's slice (static), or the whole global batch (dynamic)."""
        if self.balance == "dynamic":
            self._dynamic_step(x, y)
        else:
            super().__call__(x, y, lr)
        self.bytes_sent = {"ps": self.client.reset_bytes()}
        return self.result

    def optimizer_step(self):
        M = self.options.micro_batches
        self._push_and_pull(sum(self.losses) / (M * self.shards), M)

    def _dynamic_step(self, x, y):
        """Micro-batches of the global batch, taken from server 0 until none is left."""
        M = self.options.micro_batches
        rows = x.shape[0] // (M * self.shards)
        self.backwards_done, self.losses = [0], []
        taken = 0
        while taking := self.client.take(self.clock):
            for index in taking:
                part = slice(index * rows, (index + 1) * rows)
                loss, cache = self.forward(0, x[part], y[part])
                self.record_loss(loss)
                self.backward(0, cache, None)
                taken += 1
        if not taken:
            self.grads.flat[...] = 0
        self.micro_done += taken
        self._push_and_pull(sum(self.losses) / (M * self.shards), taken)

    def _push_and_pull(self, loss, micro):
        self.client.push(self.clock, self.grads.flat, loss, micro, preempt.pending())
        self.clock += 1
        info = self.client.pull(self.clock)
        self.skipped = bool(info[3])
        self.result = (float(info[1]), float(info[2]))

    def stop_requested(self, step) -> bool:
        """Whether every worker stops at `step` (a preemption signal on any worker, agreed
        by the servers: comm/ps.py); no collective, so the staleness survives."""
        stop_at, signum = int(self.client.info[5]), int(self.client.info[6])
        if 0 <= stop_at <= step:
            preempt.adopt(signum)
            return True
        return False

    def staleness_counts(self):
        """Pushes applied or waiting so far, by staleness 0..k (server 0's count)."""
        return self.client.info[ps.PARAMS_HEADER:].astype(int)

    def save(self, cfg, layout, run_dir, step, tokenizer, log):
        """Meets the servers at clock `step` and joins their checkpoint of it."""
        self.client.sync(step)
        save_state(cfg, layout, self.client.comm, run_dir, step, tokenizer, self.params, None,
                   None, log)

    def current_params(self):
        """Waits for every clock before the next one: the parameters the ring would hold."""
        self.client.pull(self.clock, fresh=True)
        return self.params


def serve(cfg, layout, comm, servers_comm, run_dir, tokenizer, resume_from):
    """A server's whole job: its shard of the model, until every worker stops. Returns the
    trainer's history (no losses: the workers report them)."""
    model_cfg = cfg.model_config()
    params = gpt.init_params(model_cfg, cfg.seed, np, np.dtype(cfg.dtype))
    state = ServerState(cfg, servers_comm, params, cfg.timeout)
    first = load_checkpoint(resume_from, params, state.optimizer) if resume_from else 0
    micro_total = layout.dp * layout.micro_batches

    decode = None
    if cfg.compress != "none":  # decoding keeps no state: any instance of the method does
        method = make_compressor(cfg.compress, cfg.compress_ratio, cfg.compress_rank)

        def decode(buffer):
            return method.decompress(method.from_buffer(buffer))

    def save(clock):  # the workers join: a checkpoint of version `clock`
        save_state(cfg, layout, comm, run_dir, clock, tokenizer, params, state.optimizer,
                   [(state.lo, state.hi)])

    server = ps.Server(comm, layout.servers, params.flat, state.apply, cfg.staleness,
                       micro_total, decode=decode, staleness_lr=cfg.staleness_lr,
                       predict=cfg.staleness_predict,
                       start_version=first, timeout=cfg.timeout, on_sync=save)
    server.run()
    return {"loss": [], "val": {}, "params": None}


def save_state(cfg, layout, comm, run_dir, step, tokenizer, params, optimizer, ranges,
               log=lambda line: None):
    """A checkpoint of clock `step`, collective over servers and workers: each server writes
    its shard's values and moments; workers write nothing (the servers hold the truth)."""
    names = list(params.shapes) if optimizer is not None else []
    with saving(run_dir, step, cfg.steps, log):
        save_checkpoint(comm, run_dir, step, params, optimizer, names, names,
                        training_meta(cfg, layout, tokenizer), cfg.keep,
                        param_ranges=ranges)


def worker_engine(cfg, layout, comm, resume_from, options):
    """The step engine of a worker, holding the parameters of the clock it starts at."""
    first = read_manifest(resume_from)["step"] if resume_from else 0
    params = gpt.init_params(cfg.model_config(), cfg.seed, np, np.dtype(cfg.dtype))
    encode = method = None
    if cfg.compress != "none":  # error feedback per server shard (the key)
        method = make_compressor(cfg.compress, cfg.compress_ratio, cfg.compress_rank)

        def encode(server, shard):
            return method.to_buffer(method.compress(server, shard))
    client = ps.Client(comm, layout.servers, params.flat, cfg.staleness, encode,
                       timeout=cfg.timeout)
    return WorkerEngine(cfg.model_config(), cfg, client, layout.dp, first, cfg.balance,
                        params=params, compressor=method,
                        **{k: v for k, v in options.items() if k != "dtype"})
