"""`make bench-dp` / `python -m bench.dp`: data-parallel weak scaling of `baby`, 1 rank x 1
thread against 2 ranks x 1 thread, each rank with the same batch (12 sequences of 64 tokens),
ours (the step engine, app.parallel.engine.TrainStep, over comm.reducer) against PyTorch
DDP over gloo.

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
yield settings instead of the Makefile's, and a bucket-size sweep. "Paired" cells measure
the efficiency inside one 2-rank job instead (rank 0 alone, then both, alternating), which
the machine's drift between cells cannot touch.

This machine is shared: the driver measures the CPU other processes use during each cell
(/proc/stat minus its own children), reruns a disturbed cell, and drops disturbed rounds
where a quiet one exists; the `other load` column says what was kept.
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


def global_batches(vocab, ranks, T, seed=0, per_rank=PER_RANK_BATCH):
    """N_BATCHES random (x, y) global batches of ranks*per_rank rows; rank r takes rows
    r*per_rank:(r+1)*per_rank (app.data's layout rule)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (2, ranks * per_rank, T)) for _ in range(N_BATCHES)]


def rank_slice(batch, rank, per_rank=PER_RANK_BATCH):
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return np.ascontiguousarray(batch[0, rows]), np.ascontiguousarray(batch[1, rows])


# ---------------------------------------------------------------------------- workers

def worker_ours(args):
    from mpi4py import MPI

    from app.config import load_config
    from app.parallel.engine import TrainStep
    from comm.backend import keep_freed_host_memory
    from models import gpt

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    keep_freed_host_memory()
    cfg = load_config(args.config, {"batch_size": args.batch, "bucket_mb": args.bucket_mb or None,
                                    "overlap": args.overlap == "on", "zero": int(args.zero)})
    mcfg = cfg.model_config()
    params = gpt.init_params(mcfg, cfg.seed, np, np.float32)
    if args.bf16:
        from models import gemm
        gemm.use_bf16(True)
    dp_comm = None if args.no_comm or size == 1 else comm
    step = TrainStep(mcfg, params, cfg, dp_comm)
    if args.no_test and step.reducer is not None:
        step.reducer.progress = lambda: None  # no test() between layers: only finish() waits
    # no-comm: each process trains alone on its own 12 rows (no gradient exchange)
    batches = [rank_slice(b, rank, args.batch)
               for b in global_batches(cfg.vocab_size, size, cfg.block_size, per_rank=args.batch)]

    if args.paired:
        return paired(args, comm, cfg, step, batches,
                      TrainStep(mcfg, gpt.init_params(mcfg, cfg.seed, np, np.float32), cfg))

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
    allreduce_ms = None
    if step.reducer is not None:  # reference: one blocking ring all-reduce of all gradients
        from comm import ring
        buf = np.zeros_like(step.grads.flat)
        ts = []
        for _ in range(12):
            comm.Barrier()
            t0 = time.perf_counter()
            ring.all_reduce(comm, buf)
            ts.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        allreduce_ms = 1e3 * float(np.median(ts[2:]))
    row = {"times": times.tolist(), "waits": waits.tolist(), "wall": wall}
    rows = comm.gather(row, root=0)
    if rank == 0:
        print(json.dumps({
            "ranks": size, "tokens_per_rank_step": args.batch * cfg.block_size,
            "first_loss": first_loss, "thread_level": MPI.Query_thread(),
            "buckets": len(step.reducer.buckets) if step.reducer else 0,
            "bucket_mb": cfg.bucket_mb, "grad_bytes": int(step.grads.flat.nbytes),
            "allreduce_ms": allreduce_ms,
            "per_rank": rows}))


def paired(args, comm, cfg, dual, batches, single):
    """1-rank and 2-rank phases alternating in one job: rank 0 runs `args.steps` steps alone
    (no communicator; rank 1 sleeps), then both run `args.steps` data-parallel steps, for
    `args.pairs` pairs. Efficiency per pair = single ms / dual ms (weak scaling), immune to
    the machine's drift between separate cells."""
    from mpi4py import MPI

    rank = comm.Get_rank()

    def idle_until_everyone_arrives():
        request = comm.Ibarrier()
        while not request.Test():
            time.sleep(0.0005)  # the idle rank leaves its core to the working one

    def timed(fn, n):
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(*batches[i % N_BATCHES], cfg.lr)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    for i in range(args.warmup):
        if rank == 0:
            single(*batches[i % N_BATCHES], cfg.lr)
        dual(*batches[i % N_BATCHES], cfg.lr)
    ratios, singles, duals = [], [], []
    for _ in range(args.pairs):
        t_single = timed(single, args.steps) if rank == 0 else None
        idle_until_everyone_arrives()
        t_dual = comm.allreduce(timed(dual, args.steps), op=MPI.MAX)
        if rank == 0:
            singles.append(t_single)
            duals.append(t_dual)
            ratios.append(t_single / t_dual)
    if rank == 0:
        print(json.dumps({"ranks": comm.Get_size(), "paired": True, "ratios": ratios,
                          "single": singles, "dual": duals}))


def worker_torch(args):
    import torch
    import torch.distributed as dist

    from app.config import load_config
    from bench.torch_gpt import TorchGPT, make_optimizer, train_step
    from models import gpt

    torch.set_num_threads(args.threads)
    rank, size = args.rank, args.world
    cfg = load_config(args.config, {"batch_size": args.batch})
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
    batches = [tuple(torch.from_numpy(a) for a in rank_slice(b, rank, args.batch))
               for b in global_batches(cfg.vocab_size, size, cfg.block_size, per_rank=args.batch)]

    def barrier():
        if size > 1:
            dist.barrier()

    barrier()
    first_loss = None
    for i in range(args.warmup):
        loss = train_step(module, opt, *batches[i % N_BATCHES], cfg.grad_clip, args.bf16)
        first_loss = loss if first_loss is None else first_loss
    barrier()
    times = np.empty(args.steps)
    wall = time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        train_step(module, opt, *batches[i % N_BATCHES], cfg.grad_clip, args.bf16)
        times[i] = time.perf_counter() - t0
    wall = time.perf_counter() - wall
    row = {"times": times.tolist(), "waits": [0.0] * args.steps, "wall": wall,
           "first_loss": first_loss}
    rows = [None] * size
    if size > 1:
        dist.all_gather_object(rows, row)
        dist.barrier()
    else:
        rows = [row]
    if rank == 0:
        print(json.dumps({"ranks": size, "tokens_per_rank_step": args.batch * cfg.block_size,
                          "first_loss": None if first_loss is None else
                          float(np.mean([r["first_loss"] for r in rows])),
                          "per_rank": rows}))
    if size > 1:
        # gloo's teardown sometimes aborts one rank ("terminate called without an active
        # exception") when its peer is gone first: the results are out, skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


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
    """One row: how to launch it, and its results, one per round."""
    pairs = 4  # 1-rank/2-rank pairs per round, for paired cells

    def __init__(self, key, impl, ranks, overlap="-", bucket_mb=None, no_comm=False,
                 no_test=False, async_progress=False, yield_vars=True, torch=False,
                 paired=False, config=CONFIG, batch=PER_RANK_BATCH, threads=1, zero=False,
                 bf16=False):
        self.key, self.impl, self.ranks, self.overlap = key, impl, ranks, overlap
        self.bucket_mb, self.no_comm, self.no_test = bucket_mb, no_comm, no_test
        self.async_progress, self.yield_vars, self.torch = async_progress, yield_vars, torch
        self.paired = paired
        self.config, self.batch, self.threads = config, batch, threads
        self.zero, self.bf16 = zero, bf16
        self.results = []  # one worker JSON per round
        self.other_load = []  # cores used by other processes during each result
        self.max_load = 0.15

    def env(self):
        env = dict(os.environ, **THREAD_ENV, PYTHONUNBUFFERED="1")
        env.update({k: str(self.threads) for k in THREAD_ENV})
        for k in YIELD_ENV:
            env.pop(k, None)
        if self.yield_vars:
            env.update(YIELD_ENV)
        env.pop("MPIR_CVAR_ASYNC_PROGRESS", None)
        if self.async_progress:
            env["MPIR_CVAR_ASYNC_PROGRESS"] = "1"
        return env

    def measure(self, steps, warmup, timeout, max_load, retries, quiet_s, deadline=None):
        """Runs the cell; again (up to `retries` times, after waiting for quiet) while other
        processes used more than `max_load` cores during it. Keeps the last run."""
        self.max_load = max_load
        for attempt in range(retries + 1):
            wait_until_quiet(quiet_s)
            with LoadMeter() as meter:
                try:
                    result = self.run(steps, warmup, timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    if attempt == retries:
                        raise
                    print(f"  {self.key}: {str(err).strip().splitlines()[-1]}; again",
                          file=sys.stderr)
                    continue
            late = deadline is not None and time.perf_counter() > deadline
            if meter.cores <= max_load or attempt == retries or late:
                break
            print(f"  {self.key}: other processes used {meter.cores:.2f} cores; again",
                  file=sys.stderr)
        self.results.append(result)
        self.other_load.append(meter.cores)
        return result

    def run(self, steps, warmup, timeout):
        if self.paired:
            steps, warmup = 8, 3
        common = ["--steps", str(steps), "--warmup", str(warmup), "--config", self.config,
                  "--batch", str(self.batch), "--threads", str(self.threads)]
        if self.bf16:
            common.append("--bf16")
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
        if self.zero:
            cmd.append("--zero")
        if self.paired:
            cmd += ["--paired", "--pairs", str(self.pairs)]
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
            try:
                outs = [p.communicate(timeout=timeout) for p in procs]
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                    p.wait()
                raise
        for p, (_, err) in zip(procs, outs):
            if p.returncode != 0:
                raise RuntimeError(f"cell {self.key} failed ({p.returncode}):\n{err}")
        return self._keep(outs[0][0])

    def _keep(self, stdout):
        return json.loads(stdout.strip().splitlines()[-1])

    def kept(self, max_load):
        """The rounds measured while the machine was otherwise quiet (all of them, or the
        least disturbed one, if none was)."""
        clean = [r for r, load in zip(self.results, self.other_load) if load <= max_load]
        return clean or [self.results[int(np.argmin(self.other_load))]]

    def _per_rank_ms(self, field):
        """Per rank, the median over the kept rounds' steps."""
        rounds = self.kept(self.max_load)
        return [1e3 * float(np.median(sum((r["per_rank"][k][field] for r in rounds), [])))
                for k in range(self.ranks)]

    def ms(self):
        return max(self._per_rank_ms("times"))  # the slowest rank's

    def wait_ms(self):
        """(min, max) over ranks: the rank that reaches finish() last waits for the
        communication alone, the other also for its partner's backward (skew)."""
        waits = self._per_rank_ms("waits")
        return min(waits), max(waits)

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
    if not args.no_paired:
        cells += [Cell("paired_on", "ours", 2, "on", paired=True),
                  Cell("paired_nocomm", "ours (no comm)", 2, no_comm=True, paired=True)]
    if not args.quick:
        cells += [
            Cell("async", "ours +async progress", 2, "on", async_progress=True),
            Cell("notest", "ours, no test()", 2, "on", no_test=True),
            Cell("async_notest", "ours +async, no test()", 2, "on", async_progress=True,
                 no_test=True),
            Cell("noyield_on", "ours, MPICH yield dflt", 2, "on", yield_vars=False),
            Cell("noyield_off", "ours, MPICH yield dflt", 2, "off", yield_vars=False),
        ]
        cells += [Cell(f"bucket{mb:g}", "ours bucket", 2, "on", bucket_mb=mb)
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
        if c.torch or c.ranks == 1 or c.no_comm:
            return "-"
        return "%.2f/%.2f" % c.wait_ms()

    def load(c):
        kept = c.kept(c.max_load)
        worst = max(load for r, load in zip(c.results, c.other_load) if r in kept)
        return f"{worst:.2f}c" + ("" if worst <= c.max_load else " (!)")

    print(f"DP weak scaling, {CONFIG}, {PER_RANK_BATCH}x64 tokens per rank, 1 BLAS thread per "
          f"rank, fp32; median of {args.steps} timed steps x {args.rounds} round(s), slowest "
          "rank", file=out)
    head = (f"{'impl':<24}{'ranks':>5}{'overlap':>8}{'ms/step':>9}{'global tok/s':>14}"
            f"{'efficiency':>12}{'wait ms lo/hi':>14}{'other load':>12}")
    print(head, file=out)
    print("-" * len(head), file=out)
    main = ["ours1", "ours2_on", "ours2_off", "nocomm2", "torch1", "torch2"]
    groups = [[by[k] for k in main if k in by],
              [c for c in cells if c.key not in main and not c.paired]]
    for i, group in enumerate(groups):
        if i and group:
            print("-- ours, 2 ranks, variants (efficiency against ours at 1 rank) --", file=out)
        for c in group:
            name = c.impl + (f" {c.bucket_mb:g} MB" if c.bucket_mb else "")
            print(f"{name:<24}{c.ranks:>5}{c.overlap:>8}{c.ms():>9.1f}{c.tok_s():>14.0f}"
                  f"{eff(c):>12}{wait(c):>14}{load(c):>12}", file=out)
    for c in cells:
        if c.paired:
            kept = c.kept(c.max_load)
            ratios = 100 * np.array(sum((r["ratios"] for r in kept), []))
            label = c.impl + (f", overlap {c.overlap}" if c.overlap != "-" else "")
            print(f"paired, {label}: 1-rank and 2-rank phases of 8 steps alternating in one "
                  f"job, {ratios.size} pairs: efficiency median "
                  f"{np.median(ratios):.1f}%, range {ratios.min():.1f}-{ratios.max():.1f}%"
                  + ("" if max(c.other_load) <= c.max_load else " (!)"), file=out)
    on = by.get("ours2_on")
    if on and "torch2" in by:
        print(f"ours(2, overlap on) / torch DDP-gloo(2), global tok/s: "
              f"{on.tok_s() / by['torch2'].tok_s():.2f}x", file=out)
    for two, single in (("ours2_on", "ours1"), ("ours2_off", "ours1"), ("nocomm2", "ours1"),
                        ("torch2", "torch1")):
        if two not in by or single not in by:
            continue
        a, b = by[two], by[single]
        rounds = []
        for i in range(min(len(a.results), len(b.results))):
            e = a.tok_s(a.round_ms(i)) / (2 * b.tok_s(b.round_ms(i)))
            bad = max(a.other_load[i], b.other_load[i]) > args.max_load
            rounds.append(f"{100 * e:.1f}%" + ("(!)" if bad else ""))
        label = a.impl + (f", overlap {a.overlap}" if a.overlap != "-" else "")
        print(f"  efficiency by round, {label}: {', '.join(rounds)}", file=out)
    if on:
        r0 = on.results[0]
        print(f"(bucket_mb {r0['bucket_mb']:g} from app/config.py: {r0['buckets']} buckets; ring "
              f"all-reduce of all {r0['grad_bytes'] / 2**20:.2f} MB of gradients alone: "
              f"{r0['allreduce_ms']:.2f} ms; MPI thread level {r0['thread_level']}, "
              "3 = MPI_THREAD_MULTIPLE;", file=out)
        print(" wait = reducer.wait_seconds, communication not hidden by backward, median, "
              "lowest/highest rank; "
              f"other load = cores other processes used during the kept rounds, (!) over "
              f"{args.max_load}; rounds over it are dropped while a quiet one exists)", file=out)
    if on and "torch2" in by:
        losses = on.results[0]["first_loss"], by["torch2"].results[0]["first_loss"]
        print("(same init, same global batch: first-step loss ours %.6f, torch %.6f)" % losses,
              file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.dp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per cell and round")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all cells")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.25, 4.0],
                        help="extra bucket sizes in MB for ours at 2 ranks (default: config's)")
    parser.add_argument("--quick", action="store_true", help="only the six main rows")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch cells")
    parser.add_argument("--no-paired", action="store_true",
                        help="skip the paired 1-rank/2-rank in-job measurement")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these cells (keys: ours1 ours2_on ... bucket4)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per cell")
    parser.add_argument("--max-load", type=float, default=0.15,
                        help="rerun a cell while other processes used more cores than this")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed cell")
    parser.add_argument("--quiet-wait", type=float, default=8,
                        help="seconds to wait for other processes to go quiet before a cell")
    parser.add_argument("--budget", type=float, default=150,
                        help="seconds after which cells are no longer rerun or waited for")
    # worker-only
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--overlap", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--bucket-mb", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-comm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-test", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--init-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=CONFIG, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=PER_RANK_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
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
            late = time.perf_counter() > start + args.budget
            c.measure(args.steps, args.warmup, args.timeout, args.max_load, args.retries,
                      0 if late else args.quiet_wait, deadline=start + args.budget)
            what = (f"{100 * np.median(c.results[-1]['ratios']):.1f}%" if c.paired
                    else f"{c.round_ms(r):.1f} ms")
            print(f"  round {r + 1}/{args.rounds}: {c.key} {what} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print_report(cells, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
