"""`mpiexec -n P python -m bench.checkpoint`: checkpoint save and load, sharded against one
file from rank 0, and the cost of `--save-interval` in a real training run.

Part 1, `small` (or --config) in the layout dp=P with ZeRO-1, float32, after one step:
- sharded: `app.checkpoint.save_checkpoint` (each rank writes the boxes it owns; rank 0 the
  view and the manifest) and `load_checkpoint` (each rank reads the boxes it holds);
- one file: the full parameters and moments gathered to rank 0, which writes whole tensors
  into one HDF5 file (fsynced), and reads it back and broadcasts it to load.
Each is timed on the slowest rank, median of --rounds; bytes are what lands on disk.

Part 2, `baby`, P ranks: ms/step over --steps steps without checkpoints and with
`--save-interval 100`, alternating, in one run; the overhead is their ratio.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from app.atomic import fsync_path
from app.checkpoint import load_checkpoint, save_checkpoint
from app.config import load_config
from app.parallel.engine import TrainStep
from models import gpt


def slowest(comm, seconds):
    return comm.allreduce(seconds, op=MPI.MAX)


def timed(comm, fn):
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return slowest(comm, time.perf_counter() - start)


def dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def one_file_save(comm, path, step_fn):
    """Everything gathered to rank 0, written there as whole tensors."""
    opt = step_fn.optimizer
    shards = comm.gather((opt.ranges, opt.m, opt.v), root=0)
    if comm.Get_rank() == 0:
        params = step_fn.params
        m, v = np.empty_like(params.flat), np.empty_like(params.flat)
        for ranges, ms, vs in shards:
            at = 0
            for a, b in ranges:
                m[a:b], v[a:b] = ms[at:at + b - a], vs[at:at + b - a]
                at += b - a
        with h5py.File(path, "w") as f:
            for kind, flat in (("param", params.flat), ("m", m), ("v", v)):
                whole = gpt.FlatParams(params.shapes, np, flat.dtype, buffer=flat)
                for name, value in whole.items():
                    f.create_dataset(f"{kind}/{name}", data=value)
        fsync_path(path)


def one_file_load(comm, path, step_fn):
    """Rank 0 reads everything and broadcasts it; each rank keeps its share."""
    data = None
    if comm.Get_rank() == 0:
        with h5py.File(path, "r") as f:
            data = {kind: np.concatenate([f[f"{kind}/{name}"][()].ravel()
                                          for name in step_fn.params.shapes])
                    for kind in ("param", "m", "v")}
    data = comm.bcast(data, root=0)
    opt = step_fn.optimizer
    step_fn.params.flat[...] = data["param"]
    at = 0
    for a, b in opt.ranges:
        opt.m[at:at + b - a], opt.v[at:at + b - a] = data["m"][a:b], data["v"][a:b]
        at += b - a


def bench_save_load(comm, config, rounds, workdir):
    cfg = load_config(config, {"zero": 1, "batch_size": comm.Get_size() * 2})
    params = gpt.init_params(cfg.model_config(), cfg.seed)
    step_fn = TrainStep(cfg.model_config(), params, cfg, comm)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size))
    step_fn(x, x, 1e-3)
    names = list(params.shapes)
    meta = {"config": cfg.to_toml(), "dtype": cfg.dtype, "layout": {"dp": comm.Get_size()},
            "shapes": gpt.param_shapes(cfg.model_config())}
    first = comm.Get_rank() == 0
    single = workdir / "single.h5"
    times = {"sharded save": [], "sharded load": [], "one-file save": [], "one-file load": []}
    for r in range(rounds):
        times["sharded save"].append(timed(comm, lambda: save_checkpoint(
            comm, workdir, r, params, step_fn.optimizer, names if first else [], names, meta,
            keep=1)))
        times["one-file save"].append(timed(comm, lambda: one_file_save(comm, single, step_fn)))
        ckpt = workdir / "checkpoints" / f"step_{r:08d}"
        times["sharded load"].append(timed(comm, lambda: load_checkpoint(
            ckpt, params, step_fn.optimizer)))
        times["one-file load"].append(timed(comm, lambda: one_file_load(comm, single,
                                                                        step_fn)))
    sizes = {"sharded": dir_bytes(ckpt), "one-file": single.stat().st_size} if first else {}
    return cfg, {k: float(np.median(v)) for k, v in times.items()}, sizes


def bench_interval(comm, steps, workdir, data):
    """ms/step of baby without and with --save-interval 100 (alternating twice)."""
    from app.trainer import train
    cfg0 = load_config("baby", {"steps": steps, "sample_tokens": 0, "eval_interval": steps,
                                "eval_windows": 4, "check_interval": 0, "save_interval": 0,
                                "data": str(data), "log_interval": steps})
    cfg1 = load_config("baby", {**{k: getattr(cfg0, k) for k in (
        "steps", "sample_tokens", "eval_interval", "eval_windows", "check_interval", "data",
        "log_interval")}, "save_interval": 100})
    result = {"without": [], "with": []}
    for r in range(2):
        for label, cfg in (("without", cfg0), ("with", cfg1)):
            out = workdir / f"{label}{r}"
            start = time.perf_counter()
            train(cfg, out, peak_gflops=100, log=lambda *a: None, comm=comm)
            result[label].append(slowest(comm, time.perf_counter() - start) / steps)
    return {k: min(v) for k, v in result.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="baby steps per run (part 2)")
    parser.add_argument("--data", default="data/embedded.h5")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    first = comm.Get_rank() == 0
    workdir = Path(comm.bcast(tempfile.mkdtemp(prefix="bench_ckpt.", dir=os.getcwd())
                              if first else None, root=0))
    try:
        cfg, t, sizes = bench_save_load(comm, args.config, args.rounds, workdir)
        if first:
            n = gpt.num_params(cfg.model_config())
            print(f"{args.config}: {n:,} parameters, float32, dp={comm.Get_size()} with ZeRO-1; "
                  f"median of {args.rounds}, slowest rank")
            print(f"{'scheme':10s} | {'save s':>7s} {'load s':>7s} | {'MB on disk':>10s}")
            for scheme in ("sharded", "one-file"):
                print(f"{scheme:10s} | {t[scheme + ' save']:7.3f} {t[scheme + ' load']:7.3f} | "
                      f"{sizes[scheme] / 1e6:10.1f}")
            print(f"sharded / one-file: save {t['sharded save'] / t['one-file save']:.2f}x, "
                  f"load {t['sharded load'] / t['one-file load']:.2f}x the time")
        per_step = bench_interval(comm, args.steps, workdir, args.data)
        if first:
            overhead = per_step["with"] / per_step["without"] - 1
            print(f"baby, {comm.Get_size()} ranks, {args.steps} steps: "
                  f"{per_step['without'] * 1e3:.1f} ms/step without checkpoints, "
                  f"{per_step['with'] * 1e3:.1f} with --save-interval 100: "
                  f"{100 * overhead:+.1f}% of step time")
    finally:
        comm.Barrier()
        if first:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
