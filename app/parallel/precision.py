"""Mixed precision: float32 master weights, gradients and optimizer state; 16-bit
(bfloat16 or float16) weights, activations and GEMMs in forward and backward.

Each step the master weights are cast to the 16-bit copy the model runs on; backward writes
16-bit gradients, which are unscaled into the float32 gradients tensor by tensor as they
finish (micro-batches accumulate there, in float32), so that the data-parallel reduction,
clipping and AdamW see float32 only. The kernels keep statistics, softmax, the loss and
every sum in float32 (models/gpu_kernels.py).

float16 has 5 exponent bits: small gradients flush to zero unless the loss is scaled up
first. The dynamic loss scale (Micikevicius et al. 2018; torch.cuda.amp.GradScaler's
constants) starts at 2^16, halves on a step whose gradient norm is not finite (the engine
skips that step on every rank: the norm is a global sum) and doubles after 2000 finite steps.
bfloat16 has float32's exponent range and needs no scale.
"""
import numpy as np

from app.errors import UserError
from models.gpu_kernels import BFLOAT16

INITIAL_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000
MIN_SCALE = 2.0 ** -24  # below this every gradient is zero: the scale cannot be the cause


class MixedPrecision:
    def __init__(self, master, compute_dtype, dynamic_scale=None, initial_scale=INITIAL_SCALE,
                 growth_interval=GROWTH_INTERVAL):
        """master: the FlatParams the optimizer updates; compute_dtype: the model's dtype."""
        self.master = master
        self.params = master.like(compute_dtype)  # what forward and backward read
        self.grads = master.like(compute_dtype)   # what backward writes
        if dynamic_scale is None:
            dynamic_scale = np.dtype(compute_dtype) == np.float16
        self.dynamic = dynamic_scale
        self.scale = initial_scale if dynamic_scale else 1.0
        self.growth_interval = growth_interval
        self.finite_steps = 0

    def state(self):
        """[scale, finite steps since it last changed]: what a checkpoint keeps, so that a
        resumed float16 run scales as the uninterrupted one would."""
        return [self.scale, self.finite_steps]

    def restore(self, state):
        """The inverse of `state`; None (a checkpoint without it) keeps the initial scale."""
        if state is not None:
            self.scale, self.finite_steps = float(state[0]), int(state[1])

    def cast_params(self):
        """The master weights, rounded to the compute dtype: once per step, before forward."""
        self.params.flat[...] = self.master.flat

    def collect(self, master_grads, names, first):
        """Unscales the 16-bit gradients of `names` into the float32 ones: written on a
        step's first micro-batch, added on later ones."""
        inverse = 1.0 / self.scale
        for name in names:
            low = self.grads[name].astype(master_grads.flat.dtype)
            if inverse != 1.0:
                low *= inverse
            accumulated = master_grads[name]
            if first:
                accumulated[...] = low
            else:
                accumulated += low

    def update_scale(self, finite: bool) -> bool:
        """After a step: -> True when the step overflowed and the scale was lowered."""
        if not self.dynamic:
            return False
        if finite:
            self.finite_steps += 1
            if self.finite_steps == self.growth_interval:
                self.scale *= 2.0
                self.finite_steps = 0
            return False
        self.scale /= 2.0
        self.finite_steps = 0
        if self.scale < MIN_SCALE:
            # every rank decided this on the same global norm
            raise UserError(f"float16 loss scale fell below {MIN_SCALE:g}: the gradients "
                            "overflow at any scale; expected dtype bf16 or float32, or a "
                            "lower lr", everywhere=True)
        return True


def compute_dtype_of(name: str):
    """A config dtype ("float64", "float32", "bf16", "fp16") -> the dtype the model runs in."""
    if name == "bf16":
        if BFLOAT16 is None:
            raise UserError("dtype bf16 needs the ml_dtypes package: expected it installed "
                            "(pip install ml_dtypes), or dtype fp16")
        return BFLOAT16
    return np.dtype(np.float16 if name == "fp16" else name)


def master_dtype_of(name: str):
    """A config dtype -> the dtype of the weights, gradients and optimizer state."""
    return np.dtype(np.float32 if name in ("bf16", "fp16") else name)
