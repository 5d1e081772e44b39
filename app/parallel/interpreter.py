"""The interpreter: executes one stage's instruction list (app/parallel/schedules.py).

The step engine (app/parallel/engine.py) owns the arithmetic; the interpreter owns the
order and the messages:

- a run of consecutive transfers is posted together and waited for together (comm/p2p);
- Forward(mb, c) runs chunk c on the received activations (or the token ids) and keeps the
  cache until Backward(mb, c): only what the schedule says is alive stays in memory;
- Backward(mb, c) hands the cache and the received gradient to the engine;
- ReduceGrads and OptimizerStep call the engine.

It also records a timeline (`trace`) and the most activation bytes alive at once.
"""
import time

from app.parallel.schedules import (Backward, Forward, OptimizerStep, RecvActivation,
                                    ReduceGrads, SendActivation, SendGrad, TRANSFERS,
                                    neighbour)
from comm.backend import array_module
from comm.p2p import ACTIVATION, GRADIENT, exchange, message_tag


def cache_bytes(cache, params_flat, mask=None) -> int:
    """Bytes of the distinct activation arrays held in a (nested) forward cache; views of
    the parameters (caches keep the weights they multiplied by) and the causal mask (one
    array, shared by every block) are not activations."""
    seen, total, stack = {id(mask)}, 0, [cache]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif hasattr(item, "nbytes") and hasattr(item, "shape") and id(item) not in seen:
            seen.add(id(item))
            if item is not params_flat and getattr(item, "base", None) is not params_flat:
                total += item.nbytes
    return total


class Interpreter:
    def __init__(self, engine):
        self.engine = engine
        self.trace = []  # (instruction text, start s, end s) of the last step, for timelines
        self.peak_activation_bytes = 0  # most cache bytes alive at once in the last step

    def run(self, xs, ys) -> int:
        """One step's program over micro-batches xs ((r,T) ids each), ys (their targets);
        returns the bytes sent to other stages."""
        engine, program = self.engine, self.engine.program
        inbox, outbox, caches = {}, {}, {}
        self.trace, alive_bytes, self.peak_activation_bytes = [], 0, 0
        sent = 0
        origin = time.perf_counter()
        i = 0
        while i < len(program):
            op = program[i]
            start = time.perf_counter() - origin
            if type(op) in TRANSFERS:
                end = i
                while end < len(program) and type(program[end]) in TRANSFERS:
                    end += 1
                sent += self._transfer(program[i:end], inbox, outbox, xs[0].shape)
                self.trace.append((" ".join(map(str, program[i:end])), start,
                                   time.perf_counter() - origin))
                i = end
                continue
            if isinstance(op, Forward):
                spec = engine.specs[op.chunk]
                inp = xs[op.mb] if spec.first else inbox.pop((ACTIVATION, op.mb, op.chunk))
                out, cache = engine.forward(op.chunk, inp, ys[op.mb])
                nbytes = cache_bytes(cache, engine.model_params.flat, engine.mask)
                caches[op.mb, op.chunk] = cache, nbytes  # counted once: a walk is 1% of `baby`
                alive_bytes += nbytes
                if spec.last:
                    engine.record_loss(out)
                else:
                    outbox[ACTIVATION, op.mb, op.chunk] = out
                self.peak_activation_bytes = max(self.peak_activation_bytes, alive_bytes)
            elif isinstance(op, Backward):
                spec = engine.specs[op.chunk]
                upstream = None if spec.last else inbox.pop((GRADIENT, op.mb, op.chunk))
                cache, nbytes = caches.pop((op.mb, op.chunk))
                alive_bytes -= nbytes
                dx = engine.backward(op.chunk, cache, upstream)
                if dx is not None:
                    outbox[GRADIENT, op.mb, op.chunk] = dx
            elif isinstance(op, ReduceGrads):
                engine.reduce_grads()
            elif isinstance(op, OptimizerStep):
                engine.optimizer_step()
            self.trace.append((str(op), start, time.perf_counter() - origin))
            i += 1
        assert not caches and not inbox, "schedule left activations behind"
        return sent

    def _transfer(self, ops, inbox, outbox, ids_shape) -> int:
        engine = self.engine
        p, stage = engine.p, engine.stage
        n_virtual = p * len(engine.specs)
        flat = engine.model_params.flat  # activations travel in the model's dtype
        xp = array_module(flat)
        rows, T = ids_shape  # a classifier's rows may be shorter than block_size
        if engine.tp.sequence_parallel:  # stages pass their slice of the sequence
            T //= engine.tp.size
        shape = (rows, T, engine.cfg.n_embd)
        sends, recvs, arrived = [], [], []
        for op in ops:
            kind = ACTIVATION if isinstance(op, (SendActivation, RecvActivation)) else GRADIENT
            virtual = op.chunk * p + stage
            if isinstance(op, (SendActivation, SendGrad)):
                peer, _ = neighbour(stage, op.chunk, p, +1 if kind == ACTIVATION else -1)
                buf = xp.ascontiguousarray(outbox.pop((kind, op.mb, op.chunk)))
                sends.append((peer, buf, message_tag(kind, op.mb, virtual, n_virtual)))
            else:
                step = -1 if kind == ACTIVATION else +1
                peer, _ = neighbour(stage, op.chunk, p, step)
                buf = xp.empty(shape, flat.dtype)
                recvs.append((peer, buf, message_tag(kind, op.mb, virtual + step, n_virtual)))
                arrived.append(((kind, op.mb, op.chunk), buf))
        exchange(engine.comms.pp, sends, recvs, engine.timeout,
                 what=f"stage {stage}: " + " ".join(map(str, ops)))
        inbox.update(arrived)
        return sum(buf.nbytes for _, buf, _ in sends)
