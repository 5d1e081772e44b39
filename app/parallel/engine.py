"""The one step engine: one optimizer step on this rank, for every layout (dp x pp x tp,
any schedule, ZeRO-1 or not).

    this rank's slice of the global batch -> micro-batches -> this stage's program
    (app/parallel/schedules.py), run by the interpreter (app/parallel/interpreter.py)

Without a pipeline the program is the one-stage case of 1F1B, Forward(0) Backward(0)
Forward(1) ... ReduceGrads OptimizerStep: Megatron's `forward_backward_no_pipelining` is one
of its schedules too. The pieces every layout shares, written once here:

- slicing: micro-batch k is rows [k*r, (k+1)*r) of the rank's slice (of its ids, and of
  its targets: next-token ids, or a classifier's models.classifier.ClassTargets);
- loss scaling: each micro-batch loss is the mean over its tokens (a classifier's: over its
  rows) and backward runs with dloss = 1/(M*dp); micro-batches have equal rows, so the sum
  over ranks is the gradient of the mean over the global batch;
- accumulation: a chunk's first backward writes its gradients, later ones write a scratch
  buffer that is added in tensor by tensor as backward finishes it;
- data-parallel reduction: on a chunk's last backward each finished tensor goes to the
  bucketed reducer (comm/reducer.py), whose ring all-reduce (reduce-scatter under ZeRO-1)
  overlaps the rest of backward, pipelines included;
- the tied wte: the first and last stage sum their shares at ReduceGrads, before its bucket
  is reduced (the two sums commute), so ZeRO-1 works with pipelines (a classifier's head
  has its own weights: wte is the first stage's alone);
- clipping by the norm of the whole model's gradient, each logical element counted once
  (data-parallel replicas, tensor-parallel replicated parameters, the second wte);
- the global loss, summed with the norm in one small ring all-reduce per grid axis, so
  that every rank gets the same bits and skips a non-finite step alike;
- AdamW on the elements this rank owns, then the ZeRO-1 all-gather.
"""
import math
from dataclasses import dataclass

import numpy as np

from app.parallel.interpreter import Interpreter
from app.parallel.precision import MixedPrecision
from app.parallel.partition import uniform
from app.parallel.schedules import gpipe, interleaved_1f1b, one_f_one_b
from comm import ring, watchdog
from comm.backend import array_module
from comm.group import RingGroup
from comm.reducer import GradReducer
from models import gpt, layers, parallel, sharding
from models.optim import AdamW, clip_by_global_norm, decay_mask


@dataclass(frozen=True)
class Comms:
    """This rank's communicators along the grid axes (None: that axis has size 1)."""
    dp: object = None
    pp: object = None
    tp: object = None

    @classmethod
    def of_grid(cls, grid):
        return cls(*(c if c.Get_size() > 1 else None
                     for c in (grid.dp_comm, grid.pp_comm, grid.tp_comm)))


def _size(comm):
    return comm.Get_size() if comm is not None else 1


def _rank(comm):
    return comm.Get_rank() if comm is not None else 0


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


class StepEngine:
    def __init__(self, model_cfg, options, comms=Comms(), *, schedule="1f1b", chunks=1,
                 ranges=None, params=None, seed=0, dtype=np.float64, xp=np, timeout=None,
                 sequence_parallel=False, recompute="none", data_shards=None,
                 local_optimizer=True, compressor=None, lr_scales=None, compute_dtype=None,
                 mixed_options=None):
        """options: a TrainConfig (micro_batches, grad_clip, betas, weight_decay, bucket_mb,
        zero, overlap). `params`: this rank's FlatParams, updated in place (default: built
        here, with the values the whole model is initialised with). `data_shards`: the
        slices the global batch is cut into (default dp; a parameter server's workers);
        without `local_optimizer` the update is a subclass's (app/parallel/ps.py);
        `compressor` (comm/compress.py) compresses the data-parallel reduction; `lr_scales`:
        name -> learning-rate factor of that tensor (a fine-tuned classifier's head);
        `compute_dtype`: the dtype the model runs in, when not the parameters' (mixed
        precision, app/parallel/precision.py; `mixed_options`: MixedPrecision's)."""
        self.cfg, self.options, self.comms = model_cfg, options, comms
        self.timeout, self.recompute = timeout, recompute
        self.dp, self.p, self.tp_size = _size(comms.dp), _size(comms.pp), _size(comms.tp)
        self.shards = data_shards or self.dp
        self.stage, self.tp_rank = _rank(comms.pp), _rank(comms.tp)
        self.specs = chunk_specs(model_cfg.n_layer, self.p, chunks, self.stage, ranges)
        names = gpt.stage_param_names(model_cfg, self.specs)
        if params is None:
            params = sharding.init_rank_params(model_cfg, seed, names, xp, dtype, self.tp_size,
                                          self.tp_rank)
        xp, dtype = array_module(params.flat), params.flat.dtype
        self.params = params
        self.grads = params.like()
        self.mixed = None
        if compute_dtype is not None and np.dtype(compute_dtype) != dtype:
            self.mixed = MixedPrecision(params, compute_dtype, **(mixed_options or {}))
            dtype = np.dtype(compute_dtype)
        # the model's weights: the 16-bit copy under mixed precision, else the parameters
        self.model_params = self.mixed.params if self.mixed else params
        self.overflowed = False  # the last step was skipped for a float16 overflow
        self.scratch = params.like() if options.micro_batches > 1 and not self.mixed else None
        self.program = make_program(schedule, self.p, options.micro_batches, chunks,
                                    self.stage)
        group = RingGroup(comms.tp) if comms.tp is not None else parallel.SOLO
        self.tp = parallel.TensorParallel(group, sequence_parallel and self.tp_size > 1)
        self.compressor = compressor  # the trainer warms top-k's ratio up
        self.reducer = None
        if self.dp > 1:
            tensors = {name: (params.offsets[name], params.offsets[name] + view.size)
                       for name, view in params.items()}
            self.reducer = GradReducer(comms.dp, self.grads.flat, tensors,
                                       options.bucket_mb * 2 ** 20, shard=bool(options.zero),
                                       overlap=options.overlap, compressor=compressor)
        self.owned = self.reducer.owned_ranges() if self.reducer else [(0, params.size)]
        scaled = [(params.offsets[name], params.offsets[name] + params[name].size, factor)
                  for name, factor in (lr_scales or {}).items() if name in params.shapes]
        self.optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed, xp),
                               options.beta1, options.beta2,
                               weight_decay=options.weight_decay,
                               ranges=self.owned if options.zero else None,
                               lr_scales=scaled) \
            if local_optimizer else None
        self.mask = layers.causal_mask(xp, model_cfg.block_size, dtype)
        holds_first = any(s.first for s in self.specs)
        holds_last = any(s.last for s in self.specs)
        # the first and last stage each hold the LM's wte; they sum its two gradient shares
        tied = gpt.ties_wte(model_cfg) and self.p > 1
        self.tied_active = tied and (holds_first or holds_last)
        self.tied = None
        if tied:  # every stage knows the config, so all or none of them split
            with watchdog.waiting("the other stages to build the tied-embedding group",
                                  timeout):
                self.tied = comms.pp.Split(0 if self.tied_active else 1, self.stage)
        self.norm_ranges = self._counted_ranges(names, holds_first)
        self.interpreter = Interpreter(self)
        self.skipped = False  # the last step had a non-finite loss or norm: no update
        self.bytes_sent = {"dp": 0, "pp": 0, "tp": 0}  # by the last step, per kind
        # per step: backwards run per chunk, last-chunk losses, lr, (loss, norm)
        self.backwards_done, self.losses, self.lr, self.result = [], [], 0.0, (0.0, 0.0)

    # ----------------------------------------------------------------------- one step

    def __call__(self, x, y, lr):
        """x: (b, T) ids of this data-parallel rank's slice, y: its targets ((b, T) next-token
        ids, or ClassTargets of b rows) -> (mean loss over the global batch, gradient norm
        before clipping), the same on every rank."""
        M = self.options.micro_batches
        rows = x.shape[0] // M
        xs = [x[k * rows:(k + 1) * rows] for k in range(M)]
        ys = [y[k * rows:(k + 1) * rows] for k in range(M)]
        self.backwards_done = [0] * len(self.specs)
        self.losses, self.lr, self.result = [], lr, (0.0, 0.0)
        if self.tp_size > 1:
            self.tp.group.reset_bytes()
        if self.reducer:
            self.reducer.begin_step()
        if self.mixed:
            self.mixed.cast_params()
        pp_bytes = self.interpreter.run(xs, ys)
        self.bytes_sent = {"dp": self.reducer.bytes_per_step() if self.reducer else 0,
                           "pp": pp_bytes + self._tied_bytes(),
                           "tp": self.tp.group.reset_bytes() if self.tp_size > 1 else 0}
        return self.result

    def forward(self, chunk, inp, targets):
        return gpt.stage_forward(self.model_params, self.cfg, self.specs[chunk], inp, targets,
                                 self.mask, self.tp, self.recompute)

    def record_loss(self, loss):
        self.losses.append(float(loss))

    def backward(self, chunk, cache, upstream):
        """Backward of one micro-batch through chunk `chunk` (upstream: d(activations), or
        None on the last chunk) -> d(input activations) or None."""
        M = self.options.micro_batches
        done = self.backwards_done[chunk]
        self.backwards_done[chunk] += 1
        first, last = done == 0, done == M - 1
        target = self.mixed.grads if self.mixed else self.grads if first else self.scratch

        def on_ready(names):
            if self.mixed:
                self.mixed.collect(self.grads, names, first)
            elif not first:
                for name in names:
                    accumulated = self.grads[name]
                    accumulated += self.scratch[name]
            if last and self.reducer:
                # the tied wte waits for the other stage's share (reduce_grads)
                self.reducer.ready([n for n in names if not (n == "wte" and self.tied_active)])

        dloss = (self.mixed.scale if self.mixed else 1.0) / (M * self.shards)
        return gpt.stage_backward(self.specs[chunk], cache, target,
                                  dloss if upstream is None else upstream, on_ready)

    def reduce_grads(self):
        if self.tied_active:
            with watchdog.waiting("the other end of the pipeline's wte gradient", self.timeout):
                ring.all_reduce(self.tied, self.grads["wte"].reshape(-1))
            if self.reducer:
                self.reducer.ready(["wte"])
        if self.reducer:
            self.reducer.finish()

    def optimizer_step(self):
        M = self.options.micro_batches
        holds_loss = any(s.last for s in self.specs) and self.tp_rank == 0
        local_loss = sum(self.losses) / (M * self.shards) if holds_loss else 0.0
        loss, sumsq = self._sum_over_grid([local_loss, self._sumsq()])
        norm = math.sqrt(sumsq)
        for a, b in self.owned:  # the optimizer reads only these elements
            clip_by_global_norm(self.grads.flat[a:b], self.options.grad_clip, norm)
        # Both are global: every rank skips a non-finite step alike, leaving parameters and
        # moments as they were.
        self.skipped = not (math.isfinite(loss) and math.isfinite(norm))
        # a finite loss with an infinite norm is a float16 overflow: a lower scale, no harm
        self.overflowed = bool(self.mixed and self.mixed.update_scale(not self.skipped)
                               and math.isfinite(loss))
        if not self.skipped:
            self.optimizer.step(self.grads.flat, self.lr)
            if self.reducer and self.options.zero:
                self.reducer.gather_params(self.params.flat)
        self.result = (loss, norm)

    # ----------------------------------------------------------------------- pieces

    def _counted_ranges(self, names, holds_first):
        """The flat ranges whose squares this rank adds to the global norm: each logical
        element once over the whole grid."""
        if self.dp > 1 and not self.options.zero and _rank(self.comms.dp) > 0:
            return []  # replicas of dp rank 0's reduced gradient
        skip = []
        if "wte" in names and not holds_first:
            skip.append("wte")  # the first stage counts it
        if self.tp_rank > 0:  # replicated over the tensor-parallel group: rank 0 counts
            skip += [n for n in names if sharding.tp_pieces(n, self.cfg, self.tp_size, 0) is None]
        ranges = list(self.owned)
        for name in skip:
            a, b = self.params.offsets[name], self.params.offsets[name] + self.params[name].size
            ranges = [piece for lo, hi in ranges
                      for piece in ((lo, min(hi, a)), (max(lo, b), hi)) if piece[1] > piece[0]]
        return ranges

    def _sumsq(self):
        flat = self.grads.flat
        xp = array_module(flat)
        return sum(float(xp.vdot(flat[a:b], flat[a:b])) for a, b in self.norm_ranges)

    def _sum_over_grid(self, values):
        """Sums over every rank (tp, then pp, then dp) with our ring: deterministic, so
        every rank holds the same bits."""
        buf = np.array(values, dtype=np.float64)
        for comm in (self.comms.tp, self.comms.pp, self.comms.dp):
            if comm is not None:
                with watchdog.waiting("the other ranks' loss and gradient norm", self.timeout):
                    ring.all_reduce(comm, buf)
        return [float(v) for v in buf]

    def _tied_bytes(self):
        if not self.tied_active:
            return 0
        n = self.grads["wte"].size
        return ring.sent_elements("all_reduce", n, 2, self.tied.Get_rank()) * \
            self.grads.flat.itemsize

    def current_params(self):
        """This rank's parameters as of now (a parameter-server worker fetches them)."""
        return self.params

    def free(self):
        """Frees the tied-embedding communicator (the grid's own are the grid's to free)."""
        if self.tied is not None:
            self.tied.Free()
            self.tied = None

    @property
    def trace(self):
        return self.interpreter.trace

    @property
    def peak_activation_bytes(self):
        return self.interpreter.peak_activation_bytes


def TrainStep(model_cfg, params, options, dp_comm=None):
    """Data parallelism alone (the one-stage program) on the caller's `params`."""
    return StepEngine(model_cfg, options, Comms(dp=dp_comm), params=params)


def PipelineStep(model_cfg, options, pp_comm, dp_comm=None, schedule="1f1b", n_chunks=1,
                 dtype=np.float64, xp=np, seed=0, timeout=None, ranges=None):
    """A pipeline stage (with data-parallel replicas over `dp_comm`), its own parameters."""
    return StepEngine(model_cfg, options, Comms(dp=dp_comm, pp=pp_comm), schedule=schedule,
                      chunks=n_chunks, ranges=ranges, seed=seed, dtype=dtype, xp=xp,
                      timeout=timeout)
