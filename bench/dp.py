"""`make bench-dp` / `python -m bench.dp`: data-parallel weak scaling of `baby`, 1 rank x 1
thread against 2 ranks x 1 thread, each rank with the same batch (12 sequences of 64 tokens),
ours (app.step.TrainStep over comm.reducer) against PyTorch DDP over gloo.

The driver (this process, idle while cells run) starts every cell as its own job:
ours under `mpiexec -n N python -m bench.dp --worker ours ...`, torch as N plain processes
(`--worker torch`, a file:// rendezvous in a temporary directory). Cells run in `--rounds`
interleaved rounds so that drift of the machine hits all of them alike; a cell's step times
are pooled over its rounds. Every rank times each step after a barrier and warm-up; a cell's
ms/step is the slowest rank's median. Efficiency = global tok/s at 2 ranks over 2x the same
implementation's tok/s at 1 rank, both from this one invocation.

Variants of ours at 2 ranks, all overlap on unless named: MPICH's asynchronous progress
thread (MPIR_CVAR_ASYNC_PROGRESS=1; mpi4py initialises with MPI_THREAD_MULTIPLE), the
reducer's test() calls between layers switched off (bench-only monkeypatch), MPICH's own
yield settings instead of the Makefile's, and a bucket-size sweep.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "baby"
PER_RANK_BATCH = 12  # sequences of block_size (64) tokens, on every rank
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
YIELD_ENV = {"MPIR_CVAR_POLLS_BEFORE_YIELD": "10", "MPIR_CVAR_POSIX_POLL_FREQUENCY": "10"}
N_BATCHES = 4  # distinct global batches, cycled


def global_batches(vocab, ranks, T, seed=0):
    """N_BATCHES random (x, y) global batches of ranks*PER_RANK_BATCH rows; rank r takes
    rows r*12:(r+1)*12 (app.data's layout rule)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (2, ranks * PER_RANK_BATCH, T)) for _ in range(N_BATCHES)]


def rank_slice(batch, rank):
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    return np.ascontiguousarray(batch[0, rows]), np.ascontiguousarray(batch[1, rows])


# ---------------------------------------------------------------------------- workers

def worker_ours(args):
    from mpi4py import MPI

    from app.config import load_config
    from app.step import StepOptions, TrainStep
    from comm.backend import keep_freed_host_memory
    from models import gpt

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    keep_freed_host_memory()
    cfg = load_config(CONFIG, {"batch_size": PER_RANK_BATCH})
    mcfg = cfg.model_config()
    params = gpt.init_params(mcfg, cfg.seed, np, np.float32)
    options = StepOptions(grad_clip=cfg.grad_clip, beta1=cfg.beta1, beta2=cfg.beta2,
                          weight_decay=cfg.weight_decay,
                          bucket_mb=args.bucket_mb if args.bucket_mb else cfg.bucket_mb,
                          overlap=args.overlap == "on")
    dp_comm = None if args.no_comm or size == 1 else comm
    step = TrainStep(mcfg, params, options, dp_comm)
    if args.no_test and step.reducer is not None:
        step.reducer.progress = lambda: None  # no test() between layers: only finish() waits
    # no-comm: each process trains alone on its own 12 rows (no gradient exchange)
    batches = [rank_slice(b, rank) for b in global_batches(cfg.vocab_size, size, cfg.block_size)]

    comm.Barrier()
    first_loss = None
    for i in range(args.warmup):
        loss, _ = step(*batches[i % N_BATCHES], cfg.lr)
        first_loss = loss if first_loss is None else first_loss
    comm.Barrier()
    times, waits = np.empty(args.steps), np.zeros(args.steps)
    wall = time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(*batches[i % N_BATCHES], cfg.lr)
        times[i] = time.perf_counter() - t0
        if step.reducer is not None:
            waits[i] = step.reducer.wait_seconds
    wall = time.perf_counter() - wall
    row = {"times": times.tolist(), "waits": waits.tolist(), "wall": wall}
    rows = comm.gather(row, root=0)
    if rank == 0:
        print(json.dumps({
            "ranks": size, "tokens_per_rank_step": PER_RANK_BATCH * cfg.block_size,
            "first_loss": first_loss, "thread_level": MPI.Query_thread(),
            "buckets": len(step.reducer.buckets) if step.reducer else 0,
            "per_rank": rows}))


def worker_torch(args):
    import torch
    import torch.distributed as dist

    from app.config import load_config
    from bench.torch_gpt import TorchGPT, make_optimizer, train_step
    from models import gpt

    torch.set_num_threads(1)
    rank, size = args.rank, args.world
    cfg = load_config(CONFIG, {"batch_size": PER_RANK_BATCH})
    mcfg = cfg.model_config()
    init = {name: np.array(v) for name, v in
            gpt.init_params(mcfg, cfg.seed, np, np.float32).items()}
    model = TorchGPT(mcfg, init)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}",
                                rank=rank, world_size=size)
        from torch.nn.parallel import DistributedDataParallel
        module = DistributedDataParallel(model)  # default bucket_cap_mb (25)
    else:
        module = model
    opt = make_optimizer(model, gpt.is_decayed, cfg.lr, (cfg.beta1, cfg.beta2),
                         cfg.weight_decay)
    batches = [tuple(torch.from_numpy(a) for a in rank_slice(b, rank))
               for b in global_batches(cfg.vocab_size, size, cfg.block_size)]

    def barrier():
        if size > 1:
            dist.barrier()

    barrier()
    first_loss = None
    for i in range(args.warmup):
        loss = train_step(module, opt, *batches[i % N_BATCHES], cfg.grad_clip)
        first_loss = loss if first_loss is None else first_loss
    barrier()
    times = np.empty(args.steps)
    wall = time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        train_step(module, opt, *batches[i % N_BATCHES], cfg.grad_clip)
        times[i] = time.perf_counter() - t0
    wall = time.perf_counter() - wall
    row = {"times": times.tolist(), "waits": [0.0] * args.steps, "wall": wall,
           "first_loss": first_loss}
    rows = [None] * size
    if size > 1:
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        print(json.dumps({"ranks": size, "tokens_per_rank_step": PER_RANK_BATCH * cfg.block_size,
                          "first_loss": float(np.mean([r["first_loss"] for r in rows])),
                          "per_rank": rows}))


# ----------------------------------------------------------------------------- driver

def _busy_cpu_seconds():
    """CPU seconds all processes on the machine have used (from /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds():
    """CPU seconds used by this process and its finished (waited-for) children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


class LoadMeter:
    """Cores' worth of CPU used by OTHER processes (other people's jobs) over an interval:
    a cell measured while someone else computes is not a measurement of this machine."""

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        other = _busy_cpu_seconds() - self.busy - (_own_cpu_seconds() - self.own)
        self.cores = max(0.0, other) / max(wall, 1e-9)
        return False


def wait_until_quiet(limit_s, threshold=0.1, probe_s=0.5):
    """Waits (up to limit_s) for a probe interval in which others use < threshold cores."""
    deadline = time.perf_counter() + limit_s
    while True:
        with LoadMeter() as meter:
            time.sleep(probe_s)
        if meter.cores < threshold or time.perf_counter() >= deadline:
            return meter.cores


class Cell:
    def __init__(self, key, impl, ranks, overlap="-", bucket_mb=None, no_comm=False,
                 no_test=False, async_progress=False, yield_vars=True, torch=False):
        self.key, self.impl, self.ranks, self.overlap = key, impl, ranks, overlap
        self.bucket_mb, self.no_comm, self.no_test = bucket_mb, no_comm, no_test
        self.async_progress, self.yield_vars, self.torch = async_progress, yield_vars, torch
        self.results = []  # one worker JSON per round
        self.other_load = []  # cores used by other processes during each kept result

    def env(self):
        env = dict(os.environ, **THREAD_ENV, PYTHONUNBUFFERED="1")
        for k in YIELD_ENV:
            env.pop(k, None)
        if self.yield_vars:
            env.update(YIELD_ENV)
        env.pop("MPIR_CVAR_ASYNC_PROGRESS", None)
        if self.async_progress:
            env["MPIR_CVAR_ASYNC_PROGRESS"] = "1"
        return env

    def measure(self, steps, warmup, timeout, max_load, retries, quiet_s):
        """Runs the cell; again (up to `retries` times, after waiting for quiet) while other
        processes used more than `max_load` cores during it. Keeps the last run."""
        for attempt in range(retries + 1):
            wait_until_quiet(quiet_s)
            with LoadMeter() as meter:
                result = self.run(steps, warmup, timeout)
            if meter.cores <= max_load or attempt == retries:
                break
            print(f"  {self.key}: other processes used {meter.cores:.2f} cores; again",
                  file=sys.stderr)
        self.results.append(result)
        self.other_load.append(meter.cores)
        return result

    def run(self, steps, warmup, timeout):
        common = ["--steps", str(steps), "--warmup", str(warmup)]
        if self.torch:
            return self._run_torch(common, timeout)
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec, "-n", str(self.ranks), sys.executable, "-m", "bench.dp",
               "--worker", "ours", "--overlap", "off" if self.overlap == "off" else "on",
               *common]
        if self.bucket_mb:
            cmd += ["--bucket-mb", str(self.bucket_mb)]
        if self.no_comm:
            cmd.append("--no-comm")
        if self.no_test:
            cmd.append("--no-test")
        out = subprocess.run(cmd, env=self.env(), cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"cell {self.key} failed ({out.returncode}):\n{out.stderr}")
        return self._keep(out.stdout)

    def _run_torch(self, common, timeout):
        with tempfile.TemporaryDirectory() as tmp:
            procs = [subprocess.Popen(
                [sys.executable, "-m", "bench.dp", "--worker", "torch", "--rank", str(r),
                 "--world", str(self.ranks), "--init-file", os.path.join(tmp, "store"), *common],
                env=self.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True) for r in range(self.ranks)]
            outs = [p.communicate(timeout=timeout) for p in procs]
        for p, (_, err) in zip(procs, outs):
            if p.returncode != 0:
                raise RuntimeError(f"cell {self.key} failed ({p.returncode}):\n{err}")
        return self._keep(outs[0][0])

    def _keep(self, stdout):
        return json.loads(stdout.strip().splitlines()[-1])

    # pooled over rounds, per rank; the slowest rank's median counts
    def ms(self):
        return 1e3 * max(float(np.median(sum((r["per_rank"][k]["times"] for r in self.results),
                                             []))) for k in range(self.ranks))

    def wait_ms(self):
        return 1e3 * max(float(np.median(sum((r["per_rank"][k]["waits"] for r in self.results),
                                             []))) for k in range(self.ranks))

    def round_ms(self, i):
        return 1e3 * max(float(np.median(pr["times"])) for pr in self.results[i]["per_rank"])

    def tok_s(self, ms=None):
        tokens = self.ranks * self.results[0]["tokens_per_rank_step"]
        return tokens / ((ms if ms is not None else self.ms()) / 1e3)


def make_cells(args):
    cells = [
        Cell("ours1", "ours", 1),
        Cell("ours2_on", "ours", 2, "on"),
        Cell("torch1", "torch DDP-gloo", 1, torch=True),
        Cell("ours2_off", "ours", 2, "off"),
        Cell("nocomm2", "ours (no comm)", 2, no_comm=True),
        Cell("torch2", "torch DDP-gloo", 2, torch=True),
    ]
    if args.no_torch:
        cells = [c for c in cells if not c.torch]
    if not args.quick:
        cells += [
            Cell("async", "ours +async progress", 2, "on", async_progress=True),
            Cell("notest", "ours, no test()", 2, "on", no_test=True),
            Cell("async_notest", "ours +async, no test()", 2, "on", async_progress=True,
                 no_test=True),
            Cell("noyield_on", "ours, MPICH yield dflt", 2, "on", yield_vars=False),
            Cell("noyield_off", "ours, MPICH yield dflt", 2, "off", yield_vars=False),
        ]
        cells += [Cell(f"bucket{mb:g}", f"ours bucket {mb:g} MB", 2, "on", bucket_mb=mb)
                  for mb in args.sweep]
    return cells


def print_report(cells, args, out=sys.stdout):
    by = {c.key: c for c in cells}
    one = {"ours": by.get("ours1"), "torch DDP-gloo": by.get("torch1")}

    def eff(c):
        base = one.get(c.impl, by.get("ours1")) if not c.torch else one["torch DDP-gloo"]
        if c.ranks == 1 or base is None:
            return "-"
        return f"{100 * c.tok_s() / (2 * base.tok_s()):.1f}%"

    def wait(c):
        return f"{c.wait_ms():.2f}" if not c.torch and c.ranks > 1 and not c.no_comm else "-"

    print(f"DP weak scaling, {CONFIG}, {PER_RANK_BATCH}x64 tokens per rank, 1 BLAS thread per "
          f"rank, fp32; median of {args.steps} timed steps x {args.rounds} round(s), slowest "
          "rank", file=out)
    head = (f"{'impl':<24}{'ranks':>5}{'overlap':>8}{'ms/step':>9}{'global tok/s':>14}"
            f"{'efficiency':>12}{'comm wait ms':>14}{'other load':>12}")
    print(head, file=out)
    print("-" * len(head), file=out)
    main = ["ours1", "ours2_on", "ours2_off", "nocomm2", "torch1", "torch2"]
    groups = [[by[k] for k in main if k in by], [c for c in cells if c.key not in main]]
    for i, group in enumerate(groups):
        if i and group:
            print("-- ours, 2 ranks, variants (efficiency against ours at 1 rank) --", file=out)
        for c in group:
            name = c.impl + (f" {c.bucket_mb:g} MB" if c.bucket_mb else "")
            print(f"{name:<24}{c.ranks:>5}{c.overlap:>8}{c.ms():>9.1f}{c.tok_s():>14.0f}"
                  f"{eff(c):>12}{wait(c):>14}{max(c.other_load):>11.2f}c", file=out)
    on = by.get("ours2_on")
    if on and "torch2" in by:
        print(f"ours(2, overlap on) / torch DDP-gloo(2), global tok/s: "
              f"{on.tok_s() / by['torch2'].tok_s():.2f}x", file=out)
    if on and "ours1" in by:
        per_round = [on.tok_s(on.round_ms(i)) / (2 * by["ours1"].tok_s(by["ours1"].round_ms(i)))
                     for i in range(len(on.results))]
        print("ours(2, on) efficiency in each round: "
              + ", ".join(f"{100 * e:.1f}%" for e in per_round), file=out)
    if on:
        print(f"(default bucket_mb from app/config.py: {on.results[0]['buckets']} buckets; "
              f"MPI thread level {on.results[0]['thread_level']}, 3 = MPI_THREAD_MULTIPLE; "
              "comm wait = reducer.wait_seconds, communication not hidden by backward; "
              "other load = cores other processes used during the cell, worst round)", file=out)
    if on and "torch2" in by:
        print(f"(same init, same global batch: first-step loss ours "
              f"{on.results[0]['first_loss']:.6f}, torch {by['torch2'].results[0]['first_loss']:.6f})",
              file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.dp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per cell and round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all cells")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.25, 4.0],
                        help="extra bucket sizes in MB for ours at 2 ranks (default: config's)")
    parser.add_argument("--quick", action="store_true", help="only the six main rows")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch cells")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these cells (keys: ours1 ours2_on ... bucket4)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per cell")
    parser.add_argument("--max-load", type=float, default=0.15,
                        help="rerun a cell while other processes used more cores than this")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed cell")
    parser.add_argument("--quiet-wait", type=float, default=8,
                        help="seconds to wait for other processes to go quiet before a cell")
    parser.add_argument("--budget", type=float, default=180,
                        help="seconds after which cells are no longer rerun or waited for")
    # worker-only
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--overlap", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--bucket-mb", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-comm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-test", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--init-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "ours":
        return worker_ours(args)
    if args.worker == "torch":
        return worker_torch(args)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("(torch not importable: ours only)", file=sys.stderr)
            args.no_torch = True
    cells = make_cells(args)
    if args.only:
        cells = [c for c in cells if c.key in args.only]
    start = time.perf_counter()
    for r in range(args.rounds):
        for c in cells:
            budget_left = args.budget - (time.perf_counter() - start)
            c.measure(args.steps, args.warmup, args.timeout, args.max_load,
                      args.retries if budget_left > 0 else 0,
                      args.quiet_wait if budget_left > 0 else 0)
            print(f"  round {r + 1}/{args.rounds}: {c.key} {c.round_ms(r):.1f} ms "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print_report(cells, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
