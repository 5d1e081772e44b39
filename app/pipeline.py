"""The pipeline interpreter: executes one stage's instruction list (app/schedules.py).

`PipelineStep` is the pipeline's counterpart of `TrainStep`: this rank holds one or more
model chunks (`StageSpec`s, one per chunk of an interleaved schedule) and only their
parameters. One optimizer step runs the stage's program:

- a run of consecutive transfers is posted together and waited for together (comm/p2p);
- Forward(mb, c) runs chunk c on the received activations (or the token ids) and keeps
  the cache until Backward(mb, c); only what the schedule says is alive stays in memory;
- Backward(mb, c) accumulates chunk c's gradients;
- ReduceGrads sums the tied wte gradient across the first and last stage (as Megatron
  does) and all-reduces every gradient over the data-parallel ranks;
- OptimizerStep clips by the norm of the whole model's gradient (summed over stages, wte
  counted once) and runs AdamW on this rank's parameters.
"""
import math
import time

import numpy as np

from app.partition import uniform
from app.schedules import (Backward, Forward, OptimizerStep, RecvActivation, ReduceGrads,
                           SendActivation, SendGrad, TRANSFERS, gpipe, interleaved_1f1b,
                           neighbour, one_f_one_b)
from comm import ring, watchdog
from comm.backend import array_module
from comm.p2p import ACTIVATION, GRADIENT, exchange, message_tag
from models import gpt, layers
from models.optim import AdamW, clip_by_global_norm, decay_mask


def make_program(schedule: str, n_stages: int, n_micro: int, n_chunks: int, stage: int):
    if schedule == "gpipe":
        return gpipe(n_stages, n_micro)[stage]
    if schedule == "1f1b":
        return one_f_one_b(n_stages, n_micro)[stage]
    return interleaved_1f1b(n_stages, n_micro, n_chunks)[stage]


def chunk_specs(n_layer: int, n_stages: int, n_chunks: int, stage: int, ranges=None):
    """The StageSpec of each chunk this stage holds: chunk c is virtual stage c*p + stage
    of an even split (or of `ranges`, one per virtual stage)."""
    n_virtual = n_stages * n_chunks
    ranges = ranges or uniform(n_layer, n_virtual)
    return [gpt.StageSpec(*ranges[c * n_stages + stage], first=c * n_stages + stage == 0,
                          last=c * n_stages + stage == n_virtual - 1)
            for c in range(n_chunks)]


def cache_bytes(cache, params_flat) -> int:
    """Bytes of the distinct activation arrays held in a (nested) forward cache; views of
    the parameters (caches keep the weights they multiplied by) are not activations."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif hasattr(item, "nbytes") and hasattr(item, "shape") and id(item) not in seen:
            seen.add(id(item))
            if item is not params_flat and getattr(item, "base", None) is not params_flat:
                total += item.nbytes
    return total


class PipelineStep:
    def __init__(self, model_cfg, options, pp_comm, dp_comm=None, schedule="1f1b",
                 n_chunks=1, dtype=np.float64, xp=np, seed=0, timeout=None, ranges=None):
        """options: a TrainConfig (micro_batches, grad_clip, betas, weight_decay)."""
        self.cfg, self.options = model_cfg, options
        self.pp_comm, self.dp_comm = pp_comm, dp_comm
        self.p, self.stage = pp_comm.Get_size(), pp_comm.Get_rank()
        self.dp = dp_comm.Get_size() if dp_comm is not None else 1
        self.n_chunks, self.timeout = n_chunks, timeout
        self.specs = chunk_specs(model_cfg.n_layer, self.p, n_chunks, self.stage, ranges)
        names = gpt.stage_param_names(model_cfg, self.specs)
        self.params = gpt.init_stage_params(model_cfg, seed, names, xp, dtype)
        self.grads = self.params.like()
        self.scratch = self.params.like()
        self.chunk_names = [gpt.stage_param_names(model_cfg, [s]) for s in self.specs]
        self.program = make_program(schedule, self.p, options.micro_batches, n_chunks,
                                    self.stage)
        self.optimizer = AdamW(self.params.flat, decay_mask(self.params, gpt.is_decayed, xp),
                               options.beta1, options.beta2, weight_decay=options.weight_decay)
        self.mask = layers.causal_mask(xp, model_cfg.block_size, dtype)
        holds_first = any(s.first for s in self.specs)
        holds_last = any(s.last for s in self.specs)
        # the first and last stage each hold wte; they sum its two gradient shares
        self.tied_active = (holds_first or holds_last) and self.p > 1
        with watchdog.waiting("the other stages to build the tied-embedding group", timeout):
            self.tied = pp_comm.Split(0 if self.tied_active else 1, self.stage)
        self.count_wte = "wte" in names and not (holds_last and not holds_first)
        self.trace = []  # (instruction text, start s, end s) of the last step, for timelines
        self.peak_activation_bytes = 0  # most cache bytes alive at once in the last step
        self.skipped = False  # the last step had a non-finite loss or norm: no update

    def __call__(self, x, y, lr):
        """x, y: (b, T) ids of this data-parallel rank's slice -> (mean loss over the global
        batch, gradient norm before clipping), the same on every rank."""
        M = self.options.micro_batches
        rows = x.shape[0] // M
        xs = [x[k * rows:(k + 1) * rows] for k in range(M)]
        ys = [y[k * rows:(k + 1) * rows] for k in range(M)]
        self.grads.flat[...] = 0
        inbox, outbox, caches, losses = {}, {}, {}, []
        dloss = 1.0 / (M * self.dp)
        loss = norm = 0.0
        self.trace, alive_bytes, self.peak_activation_bytes = [], 0, 0
        origin = time.perf_counter()
        i = 0
        while i < len(self.program):
            op = self.program[i]
            start = time.perf_counter() - origin
            if type(op) in TRANSFERS:
                end = i
                while end < len(self.program) and type(self.program[end]) in TRANSFERS:
                    end += 1
                self._transfer(self.program[i:end], inbox, outbox, rows)
                self.trace.append((" ".join(map(str, self.program[i:end])), start,
                                   time.perf_counter() - origin))
                i = end
                continue
            if isinstance(op, Forward):
                spec = self.specs[op.chunk]
                inp = xs[op.mb] if spec.first else inbox.pop((ACTIVATION, op.mb, op.chunk))
                out, caches[op.mb, op.chunk] = gpt.stage_forward(
                    self.params, self.cfg, spec, inp, ys[op.mb], self.mask)
                if spec.last:
                    losses.append(float(out))
                else:
                    outbox[ACTIVATION, op.mb, op.chunk] = out
                alive_bytes += cache_bytes(caches[op.mb, op.chunk], self.params.flat)
                self.peak_activation_bytes = max(self.peak_activation_bytes, alive_bytes)
            elif isinstance(op, Backward):
                spec = self.specs[op.chunk]
                upstream = dloss if spec.last else inbox.pop((GRADIENT, op.mb, op.chunk))
                cache = caches.pop((op.mb, op.chunk))
                alive_bytes -= cache_bytes(cache, self.params.flat)
                dx = gpt.stage_backward(spec, cache, self.scratch, upstream)
                for name in self.chunk_names[op.chunk]:
                    accumulated = self.grads[name]
                    accumulated += self.scratch[name]
                if dx is not None:
                    outbox[GRADIENT, op.mb, op.chunk] = dx
            elif isinstance(op, ReduceGrads):
                self._reduce()
            elif isinstance(op, OptimizerStep):
                loss = self._global_loss(losses, M)
                norm = self._clip()
                # both global: every rank skips a non-finite step alike
                self.skipped = not (math.isfinite(loss) and math.isfinite(norm))
                if not self.skipped:
                    self.optimizer.step(self.grads.flat, lr)
            self.trace.append((str(op), start, time.perf_counter() - origin))
            i += 1
        assert not caches and not inbox, "schedule left activations behind"
        return loss, norm

    def _transfer(self, ops, inbox, outbox, rows):
        n_virtual = self.p * self.n_chunks
        xp = array_module(self.params.flat)
        shape = (rows, self.cfg.block_size, self.cfg.n_embd)
        sends, recvs, arrived = [], [], []
        for op in ops:
            kind = ACTIVATION if isinstance(op, (SendActivation, RecvActivation)) else GRADIENT
            virtual = op.chunk * self.p + self.stage
            if isinstance(op, (SendActivation, SendGrad)):
                peer, _ = neighbour(self.stage, op.chunk, self.p, +1 if kind == ACTIVATION
                                    else -1)
                buf = xp.ascontiguousarray(outbox.pop((kind, op.mb, op.chunk)))
                sends.append((peer, buf, message_tag(kind, op.mb, virtual, n_virtual)))
            else:
                step = -1 if kind == ACTIVATION else +1
                peer, _ = neighbour(self.stage, op.chunk, self.p, step)
                buf = xp.empty(shape, self.params.flat.dtype)
                recvs.append((peer, buf, message_tag(kind, op.mb, virtual + step, n_virtual)))
                arrived.append(((kind, op.mb, op.chunk), buf))
        exchange(self.pp_comm, sends, recvs, self.timeout,
                 what=f"stage {self.stage}: " + " ".join(map(str, ops)))
        inbox.update(arrived)

    def _reduce(self):
        if self.tied_active:
            ring.all_reduce(self.tied, self.grads["wte"].reshape(-1))
        if self.dp > 1:
            ring.all_reduce(self.dp_comm, self.grads.flat)

    def _clip(self):
        xp = array_module(self.grads.flat)
        flat = self.grads.flat
        sumsq = float(xp.vdot(flat, flat))
        if "wte" in self.params.shapes and not self.count_wte:
            sumsq -= float(xp.vdot(self.grads["wte"], self.grads["wte"]))
        with watchdog.waiting("the other stages' gradient norms", self.timeout):
            norm = math.sqrt(self.pp_comm.allreduce(sumsq))
        clip_by_global_norm(flat, self.options.grad_clip, norm)
        return norm

    def _global_loss(self, losses, M):
        """The last stage's mean over micro-batches, averaged over data-parallel ranks,
        known to every rank."""
        local = sum(losses) / M if losses else 0.0
        with watchdog.waiting("the last stage's loss", self.timeout):
            loss = self.pp_comm.bcast(local, root=self.p - 1) if self.p > 1 else local
            if self.dp > 1:
                loss = self.dp_comm.allreduce(loss) / self.dp
        return loss
