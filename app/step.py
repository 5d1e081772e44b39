"""One optimizer step on this rank's slice of the global batch.

    micro-batches -> forward/backward (gradients accumulate; each bucket's reduction starts
    as backward finishes it, on the last micro-batch only) -> wait for the reduction ->
    clip by the norm of the FULL gradient -> AdamW (on this rank's shard under ZeRO-1)
    -> all-gather the updated parameters (ZeRO-1); a non-finite loss or norm skips the update

Scaling: each micro-batch loss is the mean over its tokens; backward runs with
dloss = 1 / (micro_batches * dp), so the sum over ranks is the gradient of the mean over
the global batch, exactly what one process computes.
"""
import math
import numpy as np

from comm import ring
from comm.backend import array_module
from comm.reducer import GradReducer
from models import gpt, layers
from models.optim import AdamW, clip_by_global_norm, decay_mask


class TrainStep:
    def __init__(self, model_cfg: gpt.GPTConfig, params: gpt.FlatParams, options, dp_comm=None):
        """options: a TrainConfig (micro_batches, grad_clip, AdamW's betas and weight_decay,
        bucket_mb, zero, overlap are read from it)."""
        xp = array_module(params.flat)
        self.model_cfg = model_cfg
        self.params = params
        self.options = options
        self.dp_comm = dp_comm
        self.dp = dp_comm.Get_size() if dp_comm is not None else 1
        self.grads = params.like()
        # micro-batches after the first backpropagate here, then add into self.grads
        self.micro = params.like() if options.micro_batches > 1 else None
        self.reducer = None
        if self.dp > 1:
            tensors = {name: (params.offsets[name], params.offsets[name] + view.size)
                       for name, view in params.items()}
            self.reducer = GradReducer(dp_comm, self.grads.flat, tensors,
                                       options.bucket_mb * 2 ** 20, shard=bool(options.zero),
                                       overlap=options.overlap)
        self.owned = self.reducer.owned_ranges() if self.reducer else [(0, params.size)]
        self.optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed, xp),
                               options.beta1, options.beta2,
                               weight_decay=options.weight_decay,
                               ranges=self.owned if options.zero else None)
        self.mask = layers.causal_mask(xp, model_cfg.block_size, params.flat.dtype)
        self.skipped = False

    def __call__(self, x, y, lr):
        """x, y: (b, T) ids of this rank's slice -> (mean loss over the global batch,
        gradient norm before clipping). `skipped` tells whether a non-finite loss or norm
        left the parameters unchanged."""
        M = self.options.micro_batches
        rows = x.shape[0] // M
        if self.reducer:
            self.reducer.begin_step()
        loss_sum = 0.0
        for k in range(M):
            part = slice(k * rows, (k + 1) * rows)
            loss, cache = gpt.forward(self.params, self.model_cfg, x[part], y[part], self.mask)
            target = self.grads if k == 0 else self.micro
            gpt.backward(cache, target, dloss=1.0 / (M * self.dp),
                         on_ready=self._on_ready(k == 0, k == M - 1))
            loss_sum += float(loss)
        if self.reducer:
            self.reducer.finish()
        loss = self._global_mean(loss_sum / M)
        norm = self._clip()
        # Both are global: every rank skips a non-finite step alike, leaving parameters and
        # moments as they were.
        self.skipped = not (math.isfinite(loss) and math.isfinite(norm))
        if not self.skipped:
            self.optimizer.step(self.grads.flat, lr)
            if self.reducer and self.options.zero:
                self.reducer.gather_params(self.params.flat)
        return loss, norm

    def _on_ready(self, first, last):
        def on_ready(names):
            if not first:
                for name in names:
                    accumulated = self.grads[name]
                    accumulated += self.micro[name]
            if last and self.reducer:
                self.reducer.ready(names)
        return on_ready

    def _clip(self):
        """Norm of the full (reduced) gradient; under ZeRO-1 each rank holds a shard of it,
        so the shards' squared norms are summed across ranks first."""
        flat = self.grads.flat
        xp = array_module(flat)
        sumsq = sum(float(xp.vdot(flat[a:b], flat[a:b])) for a, b in self.owned)
        if self.reducer and self.options.zero:
            sumsq = self._sum_over_ranks(sumsq)
        norm = math.sqrt(sumsq)
        for a, b in self.owned:  # the optimizer reads only these elements
            clip_by_global_norm(flat[a:b], self.options.grad_clip, norm)
        return norm

    def _global_mean(self, local_mean):
        return self._sum_over_ranks(local_mean) / self.dp if self.dp > 1 else local_mean

    def _sum_over_ranks(self, value):
        buf = np.array([value], dtype=np.float64)
        ring.all_reduce(self.dp_comm, buf)
        return float(buf[0])
