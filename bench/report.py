"""`make report` / `python -m bench.report`: strong and weak scaling of every parallel mode.

For each config (`baby` and `small` by default), on 1, 2 and 4 ranks: strong scaling (a
global batch of 12 sequences, which splits over 1 to 4 data-parallel ranks and over 3
parameter-server workers) and weak scaling (3 sequences per rank, per worker in ps mode),
in every mode:

    dp        ring data parallelism, dp = ranks      dp-pp     dp = 2 x pp = ranks / 2
    zero      dp with ZeRO-1                         ps        1 server + ranks - 1 workers
    pp        1F1B, pp = ranks                       ps-async  ps with staleness 2
    tp        Megatron tensor parallelism, tp = ranks

In round 1 every configuration is its own job, `mpiexec -n R python -m app train --config C
--data D --steps S ...`: one BLAS thread per rank, MPICH ranks that yield, validation only
at the first and last step, no sample, no checkpoints, a log line every step,
--peak-gflops 100 (no GEMM probe). With --rounds R (defaults: `baby` 4, `small` 3) and 2
cores, rounds 2..R each visit every 1-2 rank row --visits V times (`baby` 3, `small` 1)
inside one `mpiexec -n 2` job (bench/visits.py: the same `app.trainer.train` with the
same settings, called in turn, without a process start each time); on 1 core, the later
rounds are jobs again. Every round (and every visit round) takes the rows in turn, each
starting further along the list. A later round starts only if a round as long as the
previous one would end within --budget minutes (default 17) of the start: on a slow or busy
machine the rows pool fewer rounds, and the report says how many ran. A layout the
trainer's rules refuse (6 heads on tp = 4) is listed as skipped with the trainer's reason;
a job that both kinds share runs once.

- step ms: the median over the logged steps 1..S-1 of every round (set-up and validation
  are outside them) of the logging rank's own time per step, as the trainer measures it
  (metrics.jsonl `ms_per_step`, with a log line every step: its batch and its engine call).
  A median, not the mean: on a shared machine one disturbed step would otherwise move a
  row by 5% or more. In ps mode the logging rank is the first worker, which may run up to
  2 steps (the staleness) ahead of the slowest. tok/s: the global batch's tokens over step
  ms. The row's other numbers are its job's (on 1 core, the median round's), and
  measurements.json keeps every job's and visit's step times (`rounds_steps_ms`). Rows
  with more ranks than cores run once, as a job of half the steps (at least 3).
- speedup: tok/s over the 1-rank run of the same table (the same config and strong batch,
  or per-rank batch); efficiency: speedup / ranks, a parameter server counted as a rank.
- One step split: compute is the ideal share of the 1-rank step (this rank's share of the
  tokens at the 1-rank rate), the bubble the pipeline simulator's (app/parallel/
  schedules.py `simulate` on the layout's 1F1B programs, stage costs from the partition's
  FLOP model). Ring data parallelism without ZeRO communicates only in the gradient
  buckets, and the trainer logs the wait for them that backward did not hide (rank 0's
  `comm_wait_ms`, the median): that is exposed comm, and other is the rest (ranks sharing
  memory bandwidth, smaller GEMMs). The trainer does not time pipeline transfers,
  tensor-parallel collectives, ZeRO-1's parameter all-gather or parameter-server pushes and
  pulls: there exposed comm is all the rest of the step (marked ~), an upper bound.
- MiB sent: per rank and step, the mean over the logged steps of the logging rank's
  `bytes_sent` (rank 0; in ps mode the first worker's pushes and pull requests).
- state MiB: the trainer's footprint line (parameters, gradients, AdamW's moments and the
  peak activations, each the largest over the ranks; a server's state is not in it). RSS
  MiB: the largest rank's peak resident memory (VmHWM, servers included, from /proc every
  quarter second; Python, NumPy and MPI are about 70 MiB of it).
- load: cores' worth of CPU that other processes used meanwhile (bench.dp.LoadMeter);
  before each job the driver waits up to --quiet-s seconds for them to use under 0.1.

Rows with more ranks than cores (4 on 2 cores) are marked oversubscribed: they measure
time-sharing more than the method and are not scaling results.

Output under --out (runs/report/): report.md (a table per config and kind),
measurements.json (one dict per measured configuration, for the cost model, each with its
model's 2-rank co-location factor: the median over the passes of bench.costcheck's probe
visited with its rows, two a round, or without visits over the phases of the probe run
before each round) and, with matplotlib (optional, benchmark-only), speedup_C.png and
step_time_C.png (report_plots.py).
"""
import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from app.config import load_config
from app.errors import UserError
from app.parallel.layout import plan
from app.parallel.partition import model_costs, stage_costs
from app.parallel.schedules import Backward, Forward, one_f_one_b, simulate
from app.costmodel import calibrate_laptop
from bench.costcheck import measure_colocation, one_sequence_slowdown
from bench.dp import LoadMeter, wait_until_quiet
from bench.ps import read_metrics, stream
from bench.tp import job_env, mpiexec_command

MODES = ["dp", "zero", "pp", "tp", "dp-pp", "ps", "ps-async"]
KINDS = ("strong", "weak")
STALENESS = 2
STEPS = {"baby": 20, "small": 5}  # 16 min in all on 2 cores
OTHER_STEPS = 10
# This VM's speed wanders by +-25% over seconds (a 1-rank baby step's per-second median read
# 23.4-45.8 ms within one minute; a small tp=2 row 1295 ms in one report, 1016 ms when run
# again), so a row's step time pools its steps from several rounds, every round all of the
# config's rows in turn, each round starting further along the list (reversing it instead
# measured one job twice within seconds, at the turn). Round 1 runs each row as its own
# job (memory, bytes, RSS, comm wait come from it); with 2 cores the later rounds visit the
# 1-2 rank rows inside one 2-rank job (bench/visits.py), VISITS times each per round: a
# visit of a baby row costs 1.3 s against a job's 3.5. ROUNDS also counts the calibrations
# and probes, one before each round. baby: 1 + 3 x 3 = 10 samples a row (4 visits a round,
# 13 samples, took the report to 19.6 of its 20 minutes); small's jobs are long and its
# steps span seconds: 2 samples (one job can still sit in a slow spell: a weak dp=2 row's
# 4 steps all read 1.54-1.59 s in its job, 1.06-1.30 s in its visit). Oversubscribed rows
# run once, at half the steps: they are not scaling results, and at 5 steps small's took
# 168 s of a report that ended 0.7 s past its 20 minutes on a slow spell of the VM. The
# 1-rank rows are visited twice a round (`visit_order`): baby 19 samples, small 5. small
# takes 3 rounds, not 2: with 2 (one job and one visit a row, 11-12 minutes in all) three
# reports put single rows 10-20% off their neighbours in one draw or another (a weak 1-rank
# row at 507 ms beside weak dp=2 rows at 654-664 ms that compute as much per rank), and the
# cost model's check scored 22-27 of 28; --budget keeps the slower reports under 20 minutes.
ROUNDS = {"baby": 4, "small": 3}
OTHER_ROUNDS = 1
VISITS = {"baby": 3, "small": 1}
OTHER_VISITS = 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20
FOOTPRINT = re.compile(r"^memory per rank \(the largest\): (.*?); sent per step")
FOOTPRINT_ITEM = re.compile(r"(?:parameters|gradients|optimizer|activations at the peak) "
                            r"([\d.]+) MiB")


@dataclass
class Case:
    """One row: a mode on some ranks at some global batch, in one scaling kind's table."""
    model: str
    kind: str
    mode: str  # "single" for the 1-rank baseline
    ranks: int
    batch: int
    overrides: dict
    cfg: object = None      # the resolved TrainConfig
    layout: object = None   # app.parallel.layout.Layout, None when the rules refuse it
    skipped: str = None     # the trainer's reason
    result: dict = field(default=None, repr=False)  # the job's measurement
    row: dict = field(default=None, repr=False)     # what the table shows, from result

    @property
    def key(self):
        """Equal for jobs that measure the same thing, whichever table they are in."""
        return self.model, self.ranks, self.batch, tuple(sorted(self.overrides.items()))


def micro_batches(rows, pp):
    """The most micro-batches, up to 2 pp, that split `rows` sequences evenly (1F1B's bubble
    is (p-1)/(m+p-1); more and smaller micro-batches cost Python time per message)."""
    return max((m for m in range(1, 2 * pp + 1) if rows % m == 0), default=1)


def mode_overrides(mode, ranks, batch):
    """The config keys of `mode` on `ranks` ranks at a global batch of `batch` sequences,
    or None where the mode does not exist on that many ranks."""
    if (ranks == 1) != (mode == "single") or (mode == "dp-pp" and (ranks < 4 or ranks % 2)):
        return None
    pp = ranks // 2 if mode == "dp-pp" else ranks  # dp-pp: dp = 2
    ps = {"mode": "ps", "servers": 1}
    return {"single": {}, "dp": {}, "zero": {"zero": 1}, "tp": {"tp": ranks},
            "pp": {"pp": pp, "micro_batches": micro_batches(batch, pp)},
            "dp-pp": {"pp": pp, "micro_batches": micro_batches(batch // 2, pp)},
            "ps": ps, "ps-async": {**ps, "staleness": STALENESS}}[mode]


def global_batch(kind, mode, ranks, strong_batch, weak_batch):
    if kind == "strong":
        return strong_batch
    return weak_batch * (ranks - 1 if mode.startswith("ps") else ranks)  # per worker


def plan_cases(models, ranks_list, modes, strong_batch, weak_batch):
    cases = []
    for model in models:
        for kind in KINDS:
            for ranks in ranks_list:
                for mode in ["single"] if ranks == 1 else modes:
                    batch = global_batch(kind, mode, ranks, strong_batch, weak_batch)
                    overrides = mode_overrides(mode, ranks, batch)
                    if overrides is None:
                        continue
                    case = Case(model, kind, mode, ranks, batch, overrides)
                    try:
                        case.cfg = load_config(model, {**overrides, "batch_size": batch})
                        case.layout = plan(case.cfg, ranks)
                    except UserError as err:
                        case.skipped = str(err)
                    cases.append(case)
    return cases


class PeakMemory(threading.Thread):
    """The peak resident memory (VmHWM) of each rank of one job, found in /proc by the run
    directory on its command line, sampled every `interval` s until stop()."""

    def __init__(self, run_dir, interval=0.25):
        super().__init__(daemon=True)
        self.marker, self.executable = os.fsencode(run_dir), os.fsencode(sys.executable)
        self.interval, self.peaks, self.stopped = interval, {}, threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                    if argv[0] != self.executable or self.marker not in argv:
                        continue  # mpiexec itself names the run directory too
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next(line for line in f if line.startswith("VmHWM:"))
                    self.peaks[pid] = int(hwm.split()[1]) * 1024
                except (OSError, StopIteration):
                    continue  # it ended meanwhile

    def stop(self):
        self.stopped.set()
        self.join()
        return max(self.peaks.values(), default=None)


def run_job(mpiexec, ranks, train_args, run_dir, timeout):
    """Runs `mpiexec -n ranks python -m app train ARGS` through bench.ps.stream (its own
    process group, killed whole after `timeout` s), keeping the footprint line as well as
    the step lines' arrival times."""
    env = job_env()
    cmd = [*mpiexec, "-n", str(ranks), sys.executable, "-m", "app", "train", *train_args]
    start, states = time.perf_counter(), []

    def footprint(line):
        if match := FOOTPRINT.match(line):
            states.append(sum(map(float, FOOTPRINT_ITEM.findall(match.group(1)))) * MIB)

    memory = PeakMemory(run_dir)
    memory.start()
    with tempfile.TemporaryFile("w+") as stderr:
        returncode, seen = stream(cmd, env, stderr, timeout, footprint)
        stderr.seek(0)
        tail = stderr.read().strip().splitlines()[-3:]
    failure = None
    if returncode is None:
        failure = f"over --timeout {timeout:g} s"
    elif returncode:
        failure = f"exit {returncode}: " + " | ".join(tail)
    elif len(seen) < 2:
        failure = "fewer than 2 step lines"
    return {"failure": failure, "seen": seen, "state_bytes": states[-1] if states else None,
            "rss_bytes": memory.stop(), "wall": time.perf_counter() - start}


def median_links(probes):
    """The links that the co-location probes of a model's rounds
    (bench.costcheck.measure_colocation) measured, as one: the median of each link's alpha
    and beta (their factor is `colocation_factor`'s)."""
    def median_link(key):
        links = [p[key] for p in probes if p.get(key)]
        return [statistics.median(x) for x in zip(*links)] if links else None

    return {"busy_link": median_link("busy_link"), "message_link": median_link("message_link")}


def colocation_factor(probes, visited):
    """The co-location factor the cost model reads (colocated_slowdown): the median of
    together / alone over the passes visited in turn with the rows (`ColocationProbe`
    inside the visits' job, [alone ms, together ms] each), or, without visits (1 core, 1
    round), over the phases of the probes run before each round (bench/costcheck.py
    `measure_colocation`); both are stored beside it. The visited passes are measured where
    most of a row's samples are, and they agree with the rows where the probes' own jobs do
    not: in two stored reports `small`'s visited passes read 0.96-1.01 while its probes'
    phases read 1.06 and 1.11 (medians of 10 and 15), and its weak dp = 2 rows ran as fast
    per step as one rank alone. Replayed on those reports, the factor of the visits alone
    scores 28 and 28 of 28 in the cost model's check, all the samples 28 and 26."""
    phases = [pair for probe in probes for pair in probe.get("colocation_phases") or []]
    pairs = list(visited) or phases
    if not pairs:
        return {}
    return {"colocated_slowdown": statistics.median(t / a for a, t in pairs),
            "colocation_phases": phases, "colocation_visits": list(visited)}


def median_calibration(clusters):
    """The laptop's calibrations of a model's rounds (app/costmodel.py `calibrate_laptop`)
    as one, the median of each number: stored with the rows, so that `make costcheck`
    judges the file alone, not the machine it runs on then."""
    return {"peak_flops": statistics.median(c.peak_flops for c in clusters),
            "efficiency": statistics.median(c.efficiency for c in clusters),
            "layer_overhead": statistics.median(c.layer_overhead for c in clusters)}


def median_round(results):
    """The round whose step time is the median (of an even number, the faster of the
    middle two), every field from that one job; a failed round fails the row."""
    failed = [r for r in results if r["failure"]]
    if failed:
        return failed[0]
    return sorted(results, key=lambda r: r["tok_s"])[len(results) // 2]


def combine_rounds(results, tokens, visits=()):
    """A row from its rounds: bytes, memory and comm wait from the median round's job
    (`median_round`); tok/s from the median of every logged step of every job and of every
    later round's visit (each step's own time, `logged_step_ms`; `visits`: lists of them)."""
    row = median_round(results)
    steps = [r.get("steps_ms") for r in results] + list(visits)
    if row["failure"] or not all(steps):
        return {**row, "rounds_steps_ms": None}
    pooled_s = statistics.median(ms for each in steps for ms in each) / 1e3
    return {**row, "tok_s": tokens / max(pooled_s, 1e-9), "rounds_steps_ms": steps}


def measure(case, args, runs, index, round_=0):
    steps = steps_of(case.model, args, case.ranks)
    flags = [x for key, value in case.overrides.items()
             for x in (f"--{key.replace('_', '-')}", str(value))]
    out = os.path.join(runs, f"job{index}")
    train = ["--config", case.model, "--data", args.data, "--out", out, "--overwrite",
             "--steps", str(steps), "--batch-size", str(case.batch),
             "--eval-interval", str(steps), "--eval-windows", "2", "--sample-tokens", "0",
             "--save-interval", "0", "--peak-gflops", "100", "--log-interval", "1", *flags]
    if args.quiet_s:  # a shared machine: give others' bursts a moment to pass
        wait_until_quiet(args.quiet_s)
    with LoadMeter() as meter:
        job = run_job(args.mpiexec, case.ranks, train, out, args.timeout)
    result = {**job, "load": meter.cores, "comm_wait_ms": None}
    if not result["failure"]:
        try:
            result.update(read_metrics(os.path.join(out, "metrics.jsonl")))
            result["comm_wait_ms"] = median_comm_wait(os.path.join(out, "metrics.jsonl"))
            result["steps_ms"] = logged_step_ms(os.path.join(out, "metrics.jsonl"))
        except (OSError, ValueError, KeyError) as err:
            result["failure"] = f"unreadable metrics.jsonl: {err}"
    if not result["failure"]:  # the median gap between step lines, from step 0's on
        step_s = statistics.median((t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1)
                                   in zip(job["seen"], job["seen"][1:]) if s1 > s0)
        result["tok_s"] = case.batch * case.cfg.block_size / max(step_s, 1e-9)
    what = result["failure"] or f"{result['tok_s']:.0f} tok/s"
    print(f"  {case.model} {case.mode:<8} {case.ranks} ranks, batch {case.batch:>3}, round "
          f"{round_ + 1}: {what} "
          f"({job['wall']:.1f} s, other processes {meter.cores:.2f} cores)", file=sys.stderr)
    return result


def logged_step_ms(path):
    """The logging rank's ms of each logged step after the first (set-up): with a log line
    every step, each step's own time, measured inside the trainer (no pipe, no logging)."""
    with open(path) as f:
        return [r["ms_per_step"] for r in map(json.loads, filter(str.strip, f))
                if "ms_per_step" in r][1:]


def visit_rows(cases, args, runs, first_round, total_rounds):
    """Rounds first_round.. of `cases` (1 and 2 ranks) as visits inside one `mpiexec -n 2`
    job (bench/visits.py), `visits_of` rounds of them in `visit_order`, each round also two
    passes of the co-location probe (`ColocationProbe`, at the weak batch), half a round
    apart: ({case key: [[ms per step] per visit]}, [[alone ms, together ms] per pass]). A
    failed job is a one-line SystemExit, as a failed probe is."""
    model, rounds = cases[0].model, visits_of(cases[0].model, args)
    order = visit_order(cases)
    # two passes of the probe a round, half a round apart, as the 1-rank rows are visited
    probe = {"config": model, "batch": args.weak_batch, "colocation": True}
    cases_spec = [{"config": c.model, "overrides": c.overrides, "batch": c.batch,
                   "ranks": c.ranks} for c in order]
    half = len(cases_spec) // 2
    cases_spec = cases_spec[:half] + [probe] + cases_spec[half:] + [probe]
    spec = {"data": args.data, "steps": steps_of(model, args), "rounds": rounds,
            "first_round": first_round, "total_rounds": total_rounds,
            "run_dir": os.path.join(runs, f"visits{first_round}"), "cases": cases_spec}
    path = os.path.join(runs, f"visits{first_round}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = job_env()
    if args.quiet_s:
        wait_until_quiet(args.quiet_s)
    cmd = [*args.mpiexec, "-n", "2", sys.executable, "-m", "bench.visits", path]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=args.timeout * rounds)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the visits of {model}'s rows (rounds from {first_round + 1}) took "
                         f"over {args.timeout * rounds} s (--timeout x {rounds} rounds)")
    if out.returncode:
        raise SystemExit(f"the visits of {model}'s rows (rounds from {first_round + 1}) failed "
                         f"(exit {out.returncode}): "
                         + (out.stderr.strip().splitlines() or ["no output"])[-1])
    times = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {model}: rounds {first_round + 1}-{first_round + rounds} of the 1-2 rank rows as "
          f"visits in one job: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    rows, passes, visited = {}, [], iter(order)
    for spec_case, each in zip(cases_spec, times):
        if spec_case.get("colocation"):
            passes += each
        else:
            rows.setdefault(next(visited).key, []).extend(each)
    return rows, passes


def visit_order(cases):
    """The cases in the order a round visits them, each 1-rank row twice, half a round
    apart: every prediction is scaled from them (the cost model's efficiencies, the
    report's speedups), so their noise weighs on every row (`small` once had a weak 1-rank
    row slower than its weak dp=2 rows, which compute as much per rank)."""
    n = len(cases)
    placed = [(i, case) for i, case in enumerate(cases)] + \
        [((i + n / 2) % n + 0.5, case) for i, case in enumerate(cases) if case.ranks == 1]
    return [case for _, case in sorted(placed, key=lambda p: p[0])]


def median_comm_wait(path):
    """Median of the logged steps' comm_wait_ms after the first (set-up), or None."""
    with open(path) as f:
        waits = [r["comm_wait_ms"] for r in map(json.loads, filter(str.strip, f))
                 if "comm_wait_ms" in r][1:]
    return statistics.median(waits) if waits else None


def bubble_fraction(case):
    """The simulator's idle fraction of a 1F1B step of this layout (0 without a pipeline),
    with each stage's forward and backward costs from the partition's FLOP model."""
    layout, cfg = case.layout, case.cfg
    if layout.pp == 1:
        return 0.0
    embedding, blocks, head = model_costs(cfg.model_config(), layout.rows * cfg.block_size)
    stages = stage_costs(layout.ranges, blocks, embedding, head)  # 3x a forward's cost
    costs = {Forward: [c / 3 for c in stages], Backward: [2 * c / 3 for c in stages]}
    return simulate(one_f_one_b(layout.pp, layout.micro_batches), costs).bubble_fraction


def scaling(tokens_per_s, base_tokens_per_s, ranks):
    """(speedup, parallel efficiency) against the 1-rank rate."""
    speedup = tokens_per_s / base_tokens_per_s
    return speedup, speedup / ranks


def split_step(step_ms, ideal_compute_ms, bubble, logged_wait_ms):
    """One step's ms as compute (the ideal share of the 1-rank step), pipeline bubble (a
    fraction `bubble` of the pipeline's time), exposed comm and other; exposed comm is the
    logged wait when there is one (what is left is other: contention, smaller GEMMs), else
    the residual, all that is left."""
    compute = min(ideal_compute_ms, step_ms)
    bubble_ms = min(compute * bubble / (1 - bubble), step_ms - compute)
    left = step_ms - compute - bubble_ms
    exposed = left if logged_wait_ms is None else min(logged_wait_ms, left)
    return {"compute_ms": compute, "bubble_ms": bubble_ms, "exposed_comm_ms": exposed,
            "other_ms": left - exposed,
            "exposed_comm_source": "residual" if logged_wait_ms is None else "logged"}


def fill_row(case, base):
    """Sets case.row, the table's numbers, against the 1-rank run `base`."""
    r, layout = case.result, case.layout
    tokens = case.batch * case.cfg.block_size
    step_ms = 1e3 * tokens / r["tok_s"]
    ideal_ms = 1e3 * tokens / (case.ranks - layout.servers) / base.result["tok_s"]
    only_buckets = layout.mode == "ring" and layout.pp == layout.tp == 1 and not layout.zero
    logged = (r["comm_wait_ms"] or 0.0) if only_buckets else None  # 1 rank: no wait
    speedup, efficiency = scaling(r["tok_s"], base.result["tok_s"], case.ranks)
    case.row = {"step_ms": step_ms, **split_step(step_ms, ideal_ms, bubble_fraction(case), logged),
                "speedup": speedup, "efficiency": efficiency,
                "oversubscribed": case.ranks > os.cpu_count()}


def measurement(case):
    """The measurements.json dict of a measured row."""
    layout, r, row = case.layout, case.result, case.row
    return {"model": case.model, "mode": layout.mode, "label": case.mode, "dp": layout.dp,
            "tp": layout.tp, "pp": layout.pp, "schedule": layout.schedule,
            "chunks": layout.chunks, "micro_batches": layout.micro_batches,
            "zero": int(layout.zero), "servers": layout.servers,
            "staleness": case.cfg.staleness, "ranks": case.ranks, "batch_size": case.batch,
            "block_size": case.cfg.block_size, "tokens_per_s": r["tok_s"],
            "step_ms": row["step_ms"], "exposed_comm_ms": row["exposed_comm_ms"],
            "exposed_comm_source": row["exposed_comm_source"], "compute_ms": row["compute_ms"],
            "bubble_ms": row["bubble_ms"], "other_ms": row["other_ms"],
            "bytes_per_rank_step": r["bytes"], "peak_mem_bytes": r["state_bytes"],
            "peak_rss_bytes": r["rss_bytes"], "other_load_cores": r["load"],
            "oversubscribed": row["oversubscribed"], "rounds_steps_ms": r.get("rounds_steps_ms")}


COLUMNS = ["mode", "ranks", "layout", "batch", "tok/s", "speedup", "efficiency", "step ms",
           "compute ms", "bubble ms", "exposed comm ms", "other ms", "MiB sent/rank/step",
           "state MiB/rank", "peak RSS MiB", "load"]


def layout_text(case):
    layout = case.layout
    if case.ranks == 1:
        return "1 process"
    if layout.mode == "ps":
        staleness = f", staleness {case.cfg.staleness}" if case.cfg.staleness else ""
        return f"1 server + {layout.dp} worker{'s' * (layout.dp > 1)}{staleness}"
    parts = [f"{name}={size}" for name, size in
             (("dp", layout.dp), ("pp", layout.pp), ("tp", layout.tp)) if size > 1]
    parts += ["ZeRO-1"] * layout.zero + [f"m={layout.micro_batches}"] * (layout.pp > 1)
    return " ".join(parts)


def table_row(case):
    head = [case.mode + " *" * (case.ranks > os.cpu_count()), str(case.ranks)]
    if case.skipped:
        return head + ["skipped: " + case.skipped.replace("|", "/")]
    head += [layout_text(case), str(case.batch)]
    r, row = case.result, case.row
    if r["failure"] or row is None:
        return head + ["FAILED: " + r["failure"].replace("|", "/") if r["failure"] else
                       "not compared: the 1-rank run failed"]
    over = row["oversubscribed"]
    scaled = [f"{row['speedup']:.2f}x", f"{row['efficiency']:.0%}"]
    mib = [f"{r['bytes'] / MIB:.2f}" if r["bytes"] is not None else "-",
           f"{r['state_bytes'] / MIB:.1f}" if r["state_bytes"] else "-",
           f"{r['rss_bytes'] / MIB:.0f}" if r["rss_bytes"] else "-"]
    return head + [f"{r['tok_s']:.0f}", *(f"({s})" if over else s for s in scaled),
                   f"{row['step_ms']:.1f}", f"{row['compute_ms']:.1f}",
                   f"{row['bubble_ms']:.1f}",
                   ("~" if row["exposed_comm_source"] == "residual" else "")
                   + f"{row['exposed_comm_ms']:.1f}", f"{row['other_ms']:.1f}", *mib,
                   f"{r['load']:.2f}"]


def markdown_table(table):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for case in table:
        cells = table_row(case)
        lines.append("| " + " | ".join(cells + [""] * (len(COLUMNS) - len(cells))) + " |")
    return lines


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def write_report(args, cases, elapsed, steps):
    """report.md and the plots, under args.out."""
    cores = os.cpu_count()
    lines = ["# Scaling report", "",
             f"`python -m bench.report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             f", {cpu_name()}, {cores} cores; {elapsed:.0f} s in all. Steps per job: "
             + ", ".join(f"`{m}` {s}" + (f" in {r} rounds" if r > 1 else "")
                         + (f" (after the first, {v} visit{'s' * (v > 1)} a round of every "
                            "1-2 rank row inside one job)" if r > 1 and cores >= 2 else "")
                         + (f", {o} on more ranks than cores" if o != s else "")
                         for m, (s, o, r, v) in steps.items())
             + " (step ms: the median of all its logged steps). Strong scaling: a global "
             f"batch of {args.batch} sequences; weak scaling: {args.weak_batch} sequences per rank "
             "(per worker in ps mode).", "",
             "speedup, efficiency: against the 1-rank run of the same table (a server counts "
             "as a rank). `*`: more ranks than cores: oversubscribed, not counted as scaling "
             "(its speedup and efficiency in parentheses). compute: the ideal share of the "
             "1-rank step; bubble: the 1F1B simulator's; exposed comm: the trainer's logged "
             "wait for the gradient all-reduce (ring dp; other: the rest of the step), or "
             "with `~` all the rest of the step where communication is not timed (an upper "
             "bound). state: parameters, gradients, moments and peak activations, the "
             "largest rank's (the trainer's footprint line); peak RSS: the largest rank's "
             "VmHWM; load: cores' worth of CPU other processes used. Details: `python -m "
             "bench.report --help`.", ""]
    for model in args.configs:
        block = next(c.cfg.block_size for c in cases if c.model == model and c.cfg)
        tables = {kind: [c for c in cases if c.model == model and c.kind == kind]
                  for kind in KINDS}
        for kind, table in tables.items():
            what = (f"global batch {args.batch} x {block} tokens" if kind == "strong" else
                    f"{args.weak_batch} x {block} tokens per rank")
            lines += [f"## `{model}`: {kind} scaling ({what})", "", *markdown_table(table), ""]
            if any(c.ranks > cores for c in table):
                lines += [f"`*` oversubscribed: more than {cores} ranks on {cores} cores; "
                          "these rows are not counted as scaling.", ""]
        try:
            from bench.report_plots import draw
            paths = draw(args.out, model, {kind: [c for c in table if c.row]
                                           for kind, table in tables.items()}, cores)
            lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths] + [""]
        except ImportError:
            lines += ["(no plots: matplotlib is not installed; `pip install matplotlib`)", ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def parse_list(text, option, allowed=None, convert=str, minimum=1):
    """Comma-separated values, in order, without repeats; a bad one is a one-line error."""
    values = []
    for item in (w.strip() for w in text.split(",")):
        try:
            value = convert(item)
        except ValueError:
            value = None
        if value is None or value not in (allowed or [value]) or \
                (convert is int and value < minimum):
            expected = f"one of {', '.join(allowed)}" if allowed else \
                f"an integer >= {minimum}" if convert is int else "a name"
            raise SystemExit(f"error: {option}: {item!r} is not {expected}")
        values += [value] * (value not in values)
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="baby,small", help="comma-separated configs")
    parser.add_argument("--ranks", default="1,2,4",
                        help="comma-separated rank counts (the 1-rank baseline always runs)")
    parser.add_argument("--modes", default=",".join(MODES), help=", ".join(MODES))
    parser.add_argument("--steps", default="0",
                        help=f"steps per job, >= 2 (default: {STEPS}, else {OTHER_STEPS})")
    parser.add_argument("--rounds", default="0",
                        help="rounds of each config's rows, a probe before each: the first "
                             "as jobs, the later ones (with 2 cores) as visits, the steps of "
                             f"all pooled (default: {ROUNDS}, else {OTHER_ROUNDS})")
    parser.add_argument("--visits", default="0",
                        help="visits of each 1-2 rank row per round after the first, in one "
                             f"2-rank job (default: {VISITS}, else {OTHER_VISITS})")
    parser.add_argument("--budget", default="17",
                        help="minutes: a later round starts only if a round as long as the "
                             "previous one would end within them (default 17)")
    parser.add_argument("--batch", default="12", help="strong scaling's global batch")
    parser.add_argument("--weak-batch", default="3", help="weak scaling's batch per rank")
    parser.add_argument("--data", default="data/embedded.h5")
    parser.add_argument("--out", default="runs/report")
    parser.add_argument("--timeout", default="300", help="seconds one job may run")
    parser.add_argument("--quiet-s", default="5", help="seconds to wait, at most, before each "
                        "job for other processes to use under 0.1 cores (0: no wait)")
    args = parser.parse_args(argv)
    args.configs = parse_list(args.configs, "--configs")
    for name in args.configs:
        try:
            load_config(name)
        except UserError as err:
            raise SystemExit(f"error: --configs: {err}")
    args.ranks = sorted(set(parse_list(args.ranks, "--ranks", convert=int)) | {1})
    args.modes = parse_list(args.modes, "--modes", allowed=MODES)
    for option, minimum in (("steps", 2), ("rounds", 1), ("visits", 1), ("batch", 1),
                            ("weak_batch", 1), ("timeout", 1), ("quiet_s", 0)):
        value = getattr(args, option)
        if option not in ("steps", "rounds", "visits") or value != "0":  # 0: the default
            flag = "--" + option.replace("_", "-")
            value, *more = parse_list(value, flag, convert=int, minimum=minimum)
            if more:
                raise SystemExit(f"error: {flag}: expected one integer")
        setattr(args, option, int(value))
    try:
        budget = float(args.budget)
    except ValueError:
        budget = math.nan
    if not budget > 0:
        raise SystemExit(f"error: --budget: {args.budget!r} is not a number of minutes > 0")
    args.budget = budget
    args.data = os.path.abspath(args.data)
    if not os.path.exists(args.data):
        raise SystemExit(f"error: --data: no {args.data}: make it with `make data`")
    return args


def steps_of(model, args, ranks=1):
    """Steps per job: half, at least 3, on more ranks than cores (not scaling results)."""
    steps = args.steps or STEPS.get(model, OTHER_STEPS)
    return max(3, steps // 2) if ranks > (os.cpu_count() or 1) else steps


def rounds_of(model, args):
    return args.rounds or ROUNDS.get(model, OTHER_ROUNDS)


def visits_of(model, args):
    return args.visits or VISITS.get(model, OTHER_VISITS)


def main(argv=None):
    args = parse_args(argv)
    args.mpiexec = mpiexec_command()
    started = time.perf_counter()
    cases = plan_cases(args.configs, args.ranks, args.modes, args.batch, args.weak_batch)
    jobs, factors, index, ran = {}, {}, itertools.count(), {}
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="report-") as runs:
        for model in args.configs:
            todo = list({c.key: c for c in cases if c.model == model and not c.skipped}
                        .values())
            rounds, probes = {case.key: [] for case in todo}, []
            visits, together = {case.key: [] for case in todo}, []
            calibrations, slowdowns = [], []
            n_rounds, per_round = rounds_of(model, args), visits_of(model, args)
            # round 0: every row its own job; later ones, with 2 cores, visits in one job
            total = 1 + (n_rounds - 1) * per_round if cores >= 2 else n_rounds
            round_start = time.perf_counter()
            for r in range(n_rounds):
                now = time.perf_counter()
                last_round_s = now - round_start  # the round before this one
                if r and now - started + last_round_s > args.budget * 60:
                    print(f"  {model}: rounds {r + 1}-{n_rounds} skipped: another "
                          f"{last_round_s:.0f} s would end past --budget {args.budget} min",
                          file=sys.stderr)
                    break
                round_start, ran[model] = now, r + 1
                if cores >= 2 and any(n > 1 for n in args.ranks):
                    # for the cost model's check: measured beside the rows, as it drifts
                    probes.append(measure_colocation({model: args.weak_batch})[model])
                    calibrations.append(calibrate_laptop())
                    slowdowns.append(one_sequence_slowdown(model, args.weak_batch))
                later = [case for case in todo if case.ranks <= min(cores, 2)]
                if r and cores >= 2 and later:
                    first = 1 + (r - 1) * per_round
                    rows, pairs = visit_rows(later, args, runs, first, total)
                    for key, each in rows.items():
                        visits[key] += each
                    together += pairs
                    continue
                # each round from a point further along: a drift weighs on every row alike
                again = [case for case in todo if r == 0 or case.ranks <= cores]
                turn = r * len(again) // total
                for case in again[turn:] + again[:turn]:
                    rounds[case.key].append(measure(case, args, runs, next(index), r))
            jobs.update({case.key: combine_rounds(rounds[case.key],
                                                  case.batch * case.cfg.block_size,
                                                  visits[case.key])
                         for case in todo})
            if probes:
                factors[model] = {**median_links(probes),
                                  **colocation_factor(probes, together),
                                  "laptop_calibration": median_calibration(calibrations),
                                  "one_sequence_slowdown": [args.weak_batch,
                                                            statistics.median(slowdowns)]}
                each = ", ".join(f"{p['colocated_slowdown']:.3f}" for p in probes)
                source = (f"{len(together)} passes visited with the rows" if together else
                          f"{len(factors[model]['colocation_phases'])} phases of the probes "
                          "before each round")
                print(f"  {model}: 2 ranks side by side compute x"
                      f"{factors[model]['colocated_slowdown']:.3f} as long as 1 alone: the "
                      f"median of {source} (the probes before each round read {each})",
                      file=sys.stderr)
        for case in cases:
            if not case.skipped:
                case.result = jobs[case.key]
    measured = []
    for model in args.configs:
        for kind in KINDS:
            table = [c for c in cases if c.model == model and c.kind == kind]
            base = next((c for c in table if c.mode == "single"), None)
            for case in table:
                if case.result and not case.result["failure"] and base and \
                        not base.result["failure"]:
                    fill_row(case, base)
                    measured.append(case)
    os.makedirs(args.out, exist_ok=True)
    unique = {}
    for case in measured:  # strong first: its baseline
        unique.setdefault(case.key, {**measurement(case), **factors.get(
            case.model, {"colocated_slowdown": None, "busy_link": None, "message_link": None,
                         "laptop_calibration": None, "one_sequence_slowdown": None})})
    with open(os.path.join(args.out, "measurements.json"), "w") as f:
        json.dump(list(unique.values()), f, indent=1)
    elapsed = time.perf_counter() - started
    write_report(args, cases, elapsed, {m: (steps_of(m, args), steps_of(m, args, max(args.ranks)),
                                            ran.get(m, 1),
                                            visits_of(m, args)) for m in args.configs})
    return 1 if any(c.result and c.result["failure"] for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
