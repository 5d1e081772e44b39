"""`make bench-delay` / `python -m bench.delay`: what late gradients cost the model, in one
process and deterministically (no MPI, no timing), to explain issue 10's convergence results.

A parameter-server clock applies the sum of W workers' gradients, each computed on the
parameters of a version as old as its staleness s (comm/ps.py); top-k's error feedback sends
each coordinate's gradient late, once its residual has grown large (comm/compress.py). Both
are replayed here on one process: every worker's (or rank's) slice of the global batch in
turn, the trainer's AdamW, clipping by the global norm and learning-rate schedule, on the
same data and seed as `make bench-ps` (`baby`, 300 steps, global batch 12, the embedded
corpus). The cases:

    sync          every slice on the current parameters: bench-ps's b, to the bit
    delay s       every slice on the parameters of s clocks before
    mix           each slice's staleness drawn (seeded) from bench-ps case c's histogram
    + predict     the stale parameters moved on by s times the last update, as the servers
                  do with --staleness-predict (on by default)
    topk r        4 ranks' slices, each through comm.compress's top-k (ratio r) with error
                  feedback, summed: the ring's --compress topk without warm-up, on one
                  bucket where the ring has several

The table gives each case's final validation loss and its ratio to sync's. Every number is
a function of the code and the seed alone, so the cases can be compared across machines.
Cases run --jobs at a time, each one process with one BLAS thread (about 35 s each here).
"""
import argparse
import math
import multiprocessing
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX = (0.35, 0.2, 0.45)  # bench-ps case c's staleness 0/1/2 (305/161/434 of 900 pushes)
WORKERS = 3  # as bench-ps: 1 server + 3 workers; top-k as its ring: 4 ranks
RANKS = 4

# name: (staleness distribution over 0..k, predict, top-k ratio or None)
CASES = {
    "sync": ((1.0,), False, None),
    "delay 1": ((0.0, 1.0), False, None),
    "delay 1 + predict": ((0.0, 1.0), True, None),
    "delay 2": ((0.0, 0.0, 1.0), False, None),
    "delay 2 + predict": ((0.0, 0.0, 1.0), True, None),
    "mix": (MIX, False, None),
    "mix + predict": (MIX, True, None),
    "topk 0.1": ((1.0,), False, 0.1),
    "topk 0.01": ((1.0,), False, 0.01),
}


def replay(name, config, data, steps, seed):
    """-> (name, final validation loss) of one case."""
    import numpy as np

    from app.config import load_config
    from app.data import BatchLoader, TokenData, validation_batches
    from app.evaluate import validation_loss
    from comm.compress import TopKCompressor
    from models import gpt
    from models.optim import AdamW, clip_by_global_norm, decay_mask, lr_at

    probs, predict, ratio = CASES[name]
    cfg = load_config(config, {"steps": steps, "batch_size": 12, "seed": seed})
    model_cfg = cfg.model_config()
    tokens = TokenData(data)
    loader = BatchLoader(tokens, "train", cfg.block_size, cfg.batch_size, cfg.seed)
    val = list(validation_batches(tokens, cfg.block_size, cfg.batch_size, cfg.eval_windows))
    params = gpt.init_params(model_cfg, cfg.seed, np, np.dtype(cfg.dtype))
    grads, stale = params.like(), params.like()
    optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed, np), cfg.beta1,
                      cfg.beta2, weight_decay=cfg.weight_decay)
    slices = RANKS if ratio else WORKERS
    compressor = TopKCompressor(ratio) if ratio else None
    k = len(probs) - 1
    versions = [params.flat.copy()]  # the last k + 1 versions, newest last
    updates = [np.zeros_like(params.flat)]  # the update that made each of them
    rng = np.random.default_rng(seed)
    total = np.empty_like(params.flat)
    for clock in range(steps):
        x, y = loader.batch(clock)
        rows = len(x) // slices
        total[...] = 0
        for w in range(slices):
            s = min(int(rng.choice(k + 1, p=probs)), clock) if k else 0
            if s:
                stale.flat[...] = versions[-1 - s]
                if predict:
                    stale.flat += s * updates[-1 - s]
            model = stale if s else params
            part = slice(w * rows, (w + 1) * rows)
            loss, cache = gpt.forward(model, model_cfg, x[part], y[part])
            gpt.backward(cache, grads, 1.0 / slices)
            if compressor:
                total += compressor.decompress(compressor.compress(w, grads.flat))
            else:
                total += grads.flat
        clip_by_global_norm(total, cfg.grad_clip)
        before = params.flat.copy()
        optimizer.step(total, lr_at(clock, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps))
        if k:
            updates = (updates + [params.flat - before])[-(k + 1):]
            versions = (versions + [params.flat.copy()])[-(k + 1):]
    return name, validation_loss(params, model_cfg, val)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baby")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "embedded.h5"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    for name in names:
        if name not in CASES:
            raise SystemExit(f"error: --cases: unknown case {name!r} (cases: "
                             f"{', '.join(CASES)})")
    if not os.path.exists(args.data):
        raise SystemExit(f"error: --data {args.data}: no such file (make data makes it)")
    # one BLAS thread per case: the children read it when they import numpy
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    jobs = [(n, args.config, args.data, args.steps, args.seed) for n in names]
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        results = dict(pool.starmap(replay, jobs))
    ref = results.get("sync")
    print(f"{args.config}, {args.steps} steps, global batch 12, seed {args.seed}: final "
          f"validation loss when gradients arrive late")
    print(f"{'case':<20} {'val loss':>9} {'vs sync':>8}")
    for name in names:
        ratio = f"{results[name] / ref:8.4f}" if ref and math.isfinite(ref) else f"{'-':>8}"
        print(f"{name:<20} {results[name]:9.4f} {ratio}")
    print(f"({len(names)} cases in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
