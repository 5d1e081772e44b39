"""`python -m bench.costcheck --measurements FILE...`: the cost model against measured steps.

FILE is the measurements.json that `make report` writes (bench/report.py): one dict per
measured configuration (model, mode, dp, tp, pp, schedule, chunks, micro_batches, zero,
servers, staleness, ranks, batch_size, block_size, step_ms, peak_mem_bytes, ...); several
files are judged as one (say, a longer report of each config). For each row this prints
the cost model's step time and memory per rank on the laptop preset, calibrated in this
process (app/costmodel.py `calibrate_laptop`), beside the measured ones, and judges the
target: within 15% for every configuration of 1 or 2 ranks. Rows with more ranks than
cores are marked oversubscribed and left out of the judgement; load is the cores' worth
of CPU other processes used while the row was measured (bench/report.py).

With --from-rows each model's efficiency and fixed cost per step come from its own 1-rank
rows (make report's batches of 12 and 3 sequences; `calibrated_on_rows`), and its efficiency
at one sequence per micro-batch, which weak-scaling pipelines run and no 1-rank row does,
from the slowdown make report measures for it (`one_sequence_slowdown`: baby's steps took
1.3-1.4x as long in one-sequence micro-batches, small's 1.0x). The laptop's
calibration (GEMM peak, step efficiency, Python's per-layer overhead) is the one make report
stored with the rows, the median of one per round, so that the verdict on a file is the
same wherever and whenever it is checked; only a file without it is calibrated here, where a
busy machine moves the verdict (the GEMM probe read 15 GFLOP/s beside a CI run, and the
per-layer overhead 0.18-1.22 ms from one run to the next).

Ranks that share the laptop's two cores compute slower than one rank alone: they share the
L3 cache and memory bandwidth, and ranks that exchange every step wait for the slower. That
factor (the cluster's colocated_slowdown) is measured for each model apart from every
judged row: `mpiexec -n 2` runs the model's 1-rank step (no communication) first on rank 0
alone, then on both ranks with a barrier after every step, in alternating phases of a
second or more; the factor is the median over phases of together / alone. The factor
drifts with the machine's other tenants (0.99-1.36 for `baby` in a day here), so `make
report` samples it as it samples the rows: two passes of the probe a round inside the job
that visits the rows (bench/visits.py), whose median it stores in each row (without visits,
the median of the probe's phases before each round; bench/report.py `colocation_factor`);
on a file without it, it is measured here.

A parameter server is not in app/costmodel.py; here its workers are the data-parallel
ranks, and each step's exchange is a push and a pull through the servers' links, then
the servers' passes over their shards and AdamW, which a single worker waits for even when
stale, and the polling latency of both ends (`predict_row`).

The probe then runs the model's forward and backward split over the two ranks as tensor
parallelism splits it (`tensor_parallel_costs`), timing each all-reduce as it happens: the
activations' and the loss's two numbers per token. Between two of them both ranks compute,
so each includes the wait for the later one and data just written. The line through the two
sizes is the busy link (alpha, beta) that replaces `make bench-comm`'s idle one for every
row but a parameter server's: 1.5-2x the cost of the message link, the same all-reduce timed
after 1 ms of small cached GEMMs, which the servers' rows use (`message_cost`).
"""
import argparse
import json
import math
import subprocess
import sys
import time

from app.config import load_config
from dataclasses import dataclass, replace

from app.costmodel import (OURS, Link, TrainingLayout, calibrate_laptop, laptop_cluster,
                           p2p_time, predict)
from comm.ps import MAX_POLL_PAUSE

TOLERANCE = 0.15
# s: how late a rank waiting in comm/ps.py `_poll` notices a message, measured: its sleeps
# double up to MAX_POLL_PAUSE (0.2 ms), and waking from one costs this VM ~0.25 ms more
# (a message sent after 20 ms of compute was seen 0.39-0.46 ms later, median of 40).
NOTICE_S = 2 * MAX_POLL_PAUSE
# what make report measures beside the rows and adds to each of them
PROBED = ("colocated_slowdown", "busy_link", "message_link", "laptop_calibration",
          "one_sequence_slowdown")
REQUIRED = ("model", "mode", "dp", "tp", "pp", "schedule", "chunks", "micro_batches", "zero",
            "servers", "staleness", "ranks", "batch_size", "block_size", "step_ms")


def read_rows(path):
    """The measured rows; SystemExit with one line if the file is not a list of rows."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--measurements {path}: cannot read it ({err}): expected the "
                         "measurements.json that `make report` writes") from None
    if not isinstance(rows, list):
        raise SystemExit(f"--measurements {path}: expected a JSON list of measured rows")
    for i, row in enumerate(rows):
        missing = [key for key in REQUIRED if key not in row]
        if missing:
            raise SystemExit(f"--measurements {path}: row {i} lacks {', '.join(missing)}: "
                             "expected bench/report.py's schema")
    return rows


def model_and_layout(row):
    model = load_config(row["model"], {"block_size": row["block_size"]}).model_config()
    layout = TrainingLayout(row["dp"], row["tp"], row["pp"], row["schedule"], row["chunks"],
                            row["micro_batches"], row["zero"], global_batch=row["batch_size"])
    return model, layout


def stored_calibration(rows):
    """The laptop's calibration that make report stored with the rows, or None (an older
    file: then it is measured here, and a busy machine moves the verdict)."""
    stored = [row["laptop_calibration"] for row in rows if row.get("laptop_calibration")]
    if not stored:
        return None
    keys = stored[0].keys()
    return {key: sorted(s[key] for s in stored)[len(stored) // 2] for key in keys}


def with_one_sequence(fits, rows, cluster):
    """Each model's fit with a point at one sequence per micro-batch, where make report
    measured that model's `one_sequence_slowdown` ([batch, slowdown]) at the batch of one of
    its 1-rank rows. That row took t = F + G / e + O + P (F the fixed cost, G its GEMMs at
    the peak, e the efficiency at `batch` sequences, O Python's per-layer cost of one
    micro-batch, P AdamW); in `batch` one-sequence micro-batches it takes s t = F + G / e1 +
    `batch` O + P: Python's cost is paid per micro-batch, which the prediction of a row adds
    on its own, so e1 is the GEMMs' share of the slowdown alone (counting it in e1 too put
    baby's pipelines 16-23% high when the calibration read 1.15 ms per layer)."""
    out = dict(fits)
    for name, fit in fits.items():
        pairs = dict(fit.efficiencies)
        probe = next((row["one_sequence_slowdown"] for row in rows if row["model"] == name
                      and row.get("one_sequence_slowdown")), None)
        if probe is None or 1 in pairs:
            continue
        batch, slowdown = probe
        anchor = next((row for row in rows if row["model"] == name and row["ranks"] == 1
                       and row["mode"] == "ring" and row["batch_size"] == batch), None)
        if anchor is None or batch not in pairs:
            continue
        t, F = anchor["step_ms"] / 1e3, fit.step_overhead
        gemms, _, optimizer = step_parts(anchor, cluster)
        _, overheads, _ = step_parts({**anchor, "micro_batches": batch}, cluster)
        gemm_seconds = slowdown * t - F - overheads - optimizer
        if gemm_seconds > 0:
            pairs[1] = gemms / gemm_seconds
            out[name] = Fit(fit.step_overhead, sorted(pairs.items()))
    return out


def step_parts(row, cluster):
    """(GEMMs at the peak, Python's per-layer cost, AdamW) of a row's step, in seconds."""
    model, layout = model_and_layout(row)
    plain = replace(cluster, efficiency=1.0, step_overhead=0.0)
    bare = predict(model, layout, replace(plain, layer_overhead=0.0))
    overhead = predict(model, layout, plain).step_s - bare.step_s
    return bare.step_s - bare.optimizer_s, overhead, bare.optimizer_s


def calibrated_on_rows(rows, cluster):
    """Model name -> Fit, from that model's measured 1-rank rows (make report's strong and
    weak batches), with Python's per-layer overhead as calibrated in this process. Each row
    is its GEMMs at an efficiency plus a fixed cost per step; the line through the smallest
    and the largest batch gives both. Where noise puts that cost below 0, it is 0 and each
    row keeps its own efficiency (GEMMs run faster on more rows): a layout then takes the
    efficiency at its own micro-batch size (`efficiency_at`). The 1-rank rows match by
    construction. An efficiency is against the GEMM rate the probe read, not a bound: the
    probe's median may read below what the rows' GEMMs reached (115.9 GFLOP/s in one
    report whose `small` rows ran at 1.07x that), and capping it at 1 put `small`'s 1-rank
    rows, and so all of its rows, 6-8% high."""
    points = {}
    for row in rows:
        if row["ranks"] != 1 or row["mode"] != "ring":
            continue
        gemms, overhead, optimizer = step_parts(row, cluster)
        rest = row["step_ms"] / 1e3 - overhead - optimizer
        points.setdefault(row["model"], []).append((model_and_layout(row)[1].rows, gemms,
                                                    rest))
    fits = {}
    for name, measured in points.items():
        (_, g0, t0), (_, g1, t1) = min(measured), max(measured)
        fixed = t0 - g0 * (t1 - t0) / (g1 - g0) if g1 > g0 else 0.0
        fixed = min(max(fixed, 0.0), t0 / 2)
        fits[name] = Fit(fixed, sorted((r, g / (t - fixed)) for r, g, t in measured))
    return fits


def one_sequence_slowdown(config, batch, repeats=5):
    """How much longer one rank's step of `batch` sequences takes in `batch` micro-batches of
    one sequence than in one micro-batch (median of `repeats`, in turn). A pipeline of
    weak-scaling rows runs such micro-batches; the 1-rank rows measure none: below a few
    hundred rows the GEMMs slow down and Python's per-layer cost is paid `batch` times."""
    import numpy as np

    from app.parallel.engine import TrainStep
    from models import gpt

    model = load_config(config).model_config()
    x = np.random.default_rng(0).integers(0, model.vocab_size, (batch, model.block_size))
    steps = []
    for micro in (1, batch):
        options = load_config(config, {"micro_batches": micro, "batch_size": batch})
        steps.append(TrainStep(model, gpt.init_params(model, 0, np, np.float32), options))
        steps[-1](x, x, 1e-3)  # warm-up
    times = [[], []]
    for _ in range(repeats):
        for step, samples in zip(steps, times):
            start = time.perf_counter()
            step(x, x, 1e-3)
            samples.append(time.perf_counter() - start)
    return float(np.median(times[1]) / np.median(times[0]))


@dataclass(frozen=True)
class Fit:
    step_overhead: float  # s per step
    efficiencies: list    # [(sequences per micro-batch, efficiency)]


def efficiency_at(pairs, rows):
    """The efficiency at `rows` sequences per micro-batch: log-linear between the two
    measured sizes around it, the nearest one's outside them."""
    if rows <= pairs[0][0]:
        return pairs[0][1]
    for (r0, e0), (r1, e1) in zip(pairs, pairs[1:]):
        if rows <= r1:
            return e0 + (e1 - e0) * math.log(rows / r0) / math.log(r1 / r0)
    return pairs[-1][1]


def cluster_for(row, cluster, fits, probes):
    """The laptop as it ran `row`: its model's efficiency at the row's micro-batch size, and
    its model's co-location factor and link (`measure_colocation`: a parameter server's
    message link, else the busy link), where measured."""
    changes = {}
    if row["model"] in fits:
        fit = fits[row["model"]]
        changes["efficiency"] = efficiency_at(fit.efficiencies, model_and_layout(row)[1].rows)
        changes["step_overhead"] = fit.step_overhead
    probe = probes.get(row["model"], {})
    if probe.get("colocated_slowdown"):
        changes["colocated_slowdown"] = probe["colocated_slowdown"]
    link = probe.get("message_link" if row["mode"] == "ps" else "busy_link")
    if link:
        changes["intra"] = changes["inter"] = Link(*link)
    return replace(cluster, **changes)


class ColocationProbe:
    """The co-location probe on `comm`'s 2 ranks: the model's 1-rank step (no
    communication) on rank 0 alone, then on both ranks with a barrier after every step (as
    ranks that exchange every step wait for the slower), each phase a second or more.
    `measure_colocation` runs it in phases of its own job; make report's visits
    (bench/visits.py) run one pass per round, in turn with the rows."""

    def __init__(self, config, batch, comm, min_steps):
        import numpy as np

        from app.parallel.engine import TrainStep
        from models import gpt

        self.comm, self.np = comm, np
        cfg = load_config(config, {"batch_size": batch})
        model = cfg.model_config()
        self.lr = cfg.lr
        self.step = TrainStep(model, gpt.init_params(model, cfg.seed, np, np.float32), cfg)
        self.x = np.random.default_rng(comm.Get_rank()).integers(
            0, model.vocab_size, (batch, model.block_size))
        for _ in range(2):
            start = time.perf_counter()
            self.step(self.x, self.x, self.lr)  # warm-up: allocations, caches, compiled kernels
        # phases of a second at least: a short model's few steps would be mostly noise
        self.steps = comm.bcast(max(min_steps, math.ceil(1.0 / (time.perf_counter() - start))))

    def _phase(self, lockstep):
        times = []
        for _ in range(self.steps):
            start = time.perf_counter()
            self.step(self.x, self.x, self.lr)
            if lockstep:
                self.comm.Barrier()
            times.append(time.perf_counter() - start)
        return 1e3 * float(self.np.median(times))

    def __call__(self):
        """One pass: [alone ms, together ms (the slower rank's)], on rank 0."""
        from mpi4py import MPI

        alone = self._phase(lockstep=False) if self.comm.Get_rank() == 0 else None
        sleep_until_everyone_arrives(self.comm)
        self.comm.Barrier()
        return [alone, self.comm.reduce(self._phase(lockstep=True), op=MPI.MAX)]


def sleep_until_everyone_arrives(comm):
    """A barrier that sleeps between polls: an idle rank leaves its core to the working one."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.0005)


def colocation_worker(args):
    """Under `mpiexec -n 2`: prints {"alone": [ms], "together": [ms]}, one median per phase."""
    from mpi4py import MPI

    from comm.backend import keep_freed_host_memory

    comm = MPI.COMM_WORLD
    keep_freed_host_memory()
    probe = ColocationProbe(args.config, args.batch, comm, args.steps)
    alone, together = zip(*(probe() for _ in range(args.phases)))
    costs = tensor_parallel_costs(args.config, args.batch, comm)
    messages = {n: message_cost(comm, n, args.phases) for n in MESSAGE_SIZES}
    if comm.Get_rank() == 0:
        print(json.dumps({"alone": list(alone), "together": list(together),
                          "collective": costs, "messages": messages}))


class TimedGroup:
    """A tensor-parallel group (models/parallel.py's interface) on our ring over `comm`
    that logs each all-reduce's (bytes, seconds)."""

    def __init__(self, comm):
        from comm.group import RingGroup

        self.ring, self.log = RingGroup(comm), []
        self.size, self.rank = self.ring.size, self.ring.rank

    def all_reduce(self, x):
        start = time.perf_counter()
        self.ring.all_reduce(x)
        self.log.append((x.nbytes, time.perf_counter() - start))
        return x

    def all_gather(self, x, axis):
        return self.ring.all_gather(x, axis)

    def reduce_scatter(self, x, axis):
        return self.ring.reduce_scatter(x, axis)


def tensor_parallel_costs(config, batch, comm, seconds=1.0, min_steps=3):
    """{bytes: [seconds per all-reduce]} of `config`'s forward and backward split over
    `comm`'s ranks as tensor parallelism splits it, at `batch` sequences, for a second or
    `min_steps` steps: the activations' all-reduces (Megatron's f and g) and the loss's
    one of two numbers per token. Between them both ranks compute their halves of the
    layers, as a tensor-parallel row does, so each includes the wait for the later rank and
    reads data just written; the slowest rank's median per size. {} where the model's heads
    do not split over the ranks."""
    import numpy as np

    from models import gpt, layers, parallel, sharding

    model = load_config(config).model_config()
    if model.n_head % comm.Get_size():
        return {}
    whole = gpt.whole_model(model)
    group = TimedGroup(comm)
    params = sharding.init_rank_params(model, 0, gpt.stage_param_names(model, [whole]), np,
                                       np.float32, group.size, group.rank)
    grads, tp = params.like(), parallel.TensorParallel(group)
    mask = layers.causal_mask(np, model.block_size, np.float32)
    x = np.random.default_rng(0).integers(0, model.vocab_size, (batch, model.block_size))

    def step():
        loss, cache = gpt.stage_forward(params, model, whole, x, x, mask, tp)
        gpt.stage_backward(whole, cache, grads, 1.0)

    step()  # warm-up: allocations, the ring's plans
    start = time.perf_counter()
    step()
    steps = comm.bcast(max(min_steps, math.ceil(seconds / (time.perf_counter() - start))))
    group.log.clear()
    for _ in range(steps):
        step()
    by_size = {}
    for nbytes, took in group.log:
        by_size.setdefault(nbytes, []).append(took)
    medians = comm.allgather({n: float(np.median(t)) for n, t in by_size.items()})
    return {n: [max(m[n] for m in medians)] for n in by_size}


# A parameter server's messages go between a worker and a server that mostly waits for
# them: the old probe of the busy link, a ring all-reduce between ranks that each compute
# about 1 ms of small cached GEMMs between collectives, fits them better than the
# tensor-parallel one (in three reports the servers' rows read 0.98-1.18 with the latter,
# 0.75-1.07 with the idle link). Two sizes give its alpha and beta.
MESSAGE_SIZES = (64 * 1024, 4 * 2 ** 20)
MESSAGE_ITERATIONS = 40


def message_cost(comm, nbytes, phases):
    """Seconds per all-reduce of `nbytes` over `comm`'s 2 ranks, each after ~1 ms of GEMMs:
    per phase, (GEMMs + all-reduce) - (GEMMs alone) per iteration, in alternating phases;
    the list of phases (the slower rank's)."""
    import numpy as np
    from mpi4py import MPI

    from comm import ring

    a = np.ones((256, 256), np.float32)
    out, buf = np.empty_like(a), np.ones(nbytes // 4, np.float32)

    def phase(reduce):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(MESSAGE_ITERATIONS):
            for _ in range(2):
                np.matmul(a, a, out=out)
            if reduce:
                ring.all_reduce(comm, buf)
        comm.Barrier()
        return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / MESSAGE_ITERATIONS

    phase(True)  # warm-up: the ring's plan, scratch and tags
    return [phase(True) - phase(False) for _ in range(phases)]


def busy_link(costs):
    """Link(alpha, beta) from {nbytes: [seconds per all-reduce]}, p = 2 (an all-reduce
    there is 2 alpha + n / beta): the line through the smallest and the largest size; None
    with fewer than two sizes, or when noise leaves no positive pair."""
    if len(costs) < 2:
        return None
    points = sorted((int(n), sorted(t)[len(t) // 2]) for n, t in costs.items())
    (n0, t0), (n1, t1) = points[0], points[-1]
    if t1 <= t0:
        return None
    bandwidth = (n1 - n0) / (t1 - t0)
    return Link(max(0.0, (t0 - n0 / bandwidth) / 2), bandwidth)


def colocation_batches(rows):
    """Model name -> the smallest batch of its 1-rank rows: the probe's batch."""
    batches = {}
    for row in rows:
        if row["ranks"] == 1 and row["mode"] == "ring":
            batches[row["model"]] = min(row["batch_size"], batches.get(row["model"], 10 ** 9))
    return batches


def measure_colocation(models, steps=3, phases=5, timeout=300):
    """Model name -> batch: model name -> {"colocated_slowdown": its step's time on 2 ranks
    side by side over its time alone, at that batch, on this machine (the median of the
    probe's phases); "colocation_phases": the phases, [alone ms, together ms] each;
    "busy_link" (`tensor_parallel_costs`) and "message_link" (`message_cost`): [alpha s,
    beta bytes/s] of `busy_link`, or None}."""
    from bench.tp import job_env, mpiexec_command

    env = job_env()
    factors = {}
    for name, batch in models.items():
        cmd = [*mpiexec_command(), "-n", "2", sys.executable, "-m", "bench.costcheck",
               "--worker", "--config", name, "--batch", str(batch), "--steps", str(steps),
               "--phases", str(phases)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode:
            raise SystemExit(f"the co-location probe of {name} failed (exit {out.returncode}): "
                             + " | ".join(out.stderr.strip().splitlines()[-3:]))
        times = json.loads(out.stdout.strip().splitlines()[-1])
        ratios = sorted(t / a for a, t in zip(times["alone"], times["together"]))
        link, message = busy_link(times["collective"]), busy_link(times["messages"])
        factors[name] = {"colocated_slowdown": ratios[len(ratios) // 2],
                         "colocation_phases": [list(p) for p in zip(times["alone"],
                                                                    times["together"])],
                         "busy_link": [link.latency, link.bandwidth] if link else None,
                         "message_link": [message.latency, message.bandwidth] if message
                         else None}
    return factors


def predict_row(row, cluster):
    """(step seconds, memory bytes per rank) the cost model gives a measured row."""
    prediction = predict(*model_and_layout(row), cluster, OURS)
    step = prediction.step_s
    if row["mode"] == "ps":
        # workers alone compute; each pushes its gradients and pulls the parameters, and
        # every worker's bytes pass through the servers' links
        gradient_bytes = prediction.memory["grads"] / (2 if row["micro_batches"] > 1 else 1)
        # A server applies a clock as soon as its pushes are in, before it answers the pulls
        # queued behind them: a single worker waits for the update whatever the staleness,
        # which hides only other workers' lateness.
        shard_bytes = gradient_bytes * row["dp"] / row["servers"]
        step += 2 * p2p_time(shard_bytes, cluster.intra)
        # Beside AdamW a server reads and writes its shard 5 times (the gradient's norm, its
        # copy into place, the clip), and the server notices the push, the worker the
        # answer, each NOTICE_S late.
        step += 5 * shard_bytes / cluster.memory_bandwidth + 2 * NOTICE_S
    memory = sum(prediction.memory.values()) - prediction.memory["whole_model"]
    if row["mode"] == "ps":
        memory -= prediction.memory["optimizer"]  # the servers hold it
    return step, memory


def describe(row):
    text = f"dp={row['dp']} tp={row['tp']} pp={row['pp']} mb={row['micro_batches']}"
    if row["pp"] > 1:
        text += f" {row['schedule']}"
    if row["zero"]:
        text += " zero"
    if row["mode"] == "ps":
        text = f"ps {row['servers']}s" + (f" stale {row['staleness']}" if row["staleness"]
                                           else "") + " " + text
    return text


def ratio_text(predicted, measured):
    return f"{predicted / measured:6.2f}" if measured else "     -"


def check(rows, cluster_of, cores, out=print):
    """Prints the table and the judgement; True when every 1-2 rank row is within 15%.
    cluster_of(row): the cluster that predicts the row; cores: the machine's."""
    out(f"{'model':<6} {'layout':<34} {'ranks':>5} | {'step ms':>8} {'pred':>8} {'ratio':>6} | "
        f"{'mem MiB':>8} {'pred':>8} {'ratio':>6} | load")
    judged = {"step time": [], "memory": []}
    for row in rows:
        step, memory = predict_row(row, cluster_of(row))
        measured_memory = row.get("peak_mem_bytes")
        oversubscribed = row["ranks"] > cores
        out(f"{row['model']:<6} {describe(row):<34} {row['ranks']:>5} | {row['step_ms']:>8.1f} "
            f"{step * 1e3:>8.1f} {ratio_text(step * 1e3, row['step_ms'])} | "
            f"{(measured_memory or 0) / 2 ** 20:>8.2f} {memory / 2 ** 20:>8.2f} "
            f"{ratio_text(memory, measured_memory)} | {row.get('other_load_cores') or 0:4.1f}"
            + ("  oversubscribed" if oversubscribed else ""))
        if not oversubscribed:
            judged["step time"].append(step * 1e3 / row["step_ms"])
            if measured_memory:
                judged["memory"].append(memory / measured_memory)
    passed = True
    for what, ratios in judged.items():
        if not ratios:
            out(f"{what}: no 1-2 rank rows to judge")
            continue
        worst = max(ratios, key=lambda r: abs(r - 1))
        ok = all(abs(r - 1) <= TOLERANCE for r in ratios)
        passed &= ok
        out(f"{'PASS' if ok else 'FAIL'} {what} within {TOLERANCE:.0%} for every 1-2 rank "
            f"configuration: {sum(abs(r - 1) <= TOLERANCE for r in ratios)} of {len(ratios)}, "
            f"worst ratio {worst:.2f}")
    return passed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--measurements", required=True, nargs="+", metavar="FILE",
                        help="measurements.json written by `make report`; several files "
                             "(say, one report per config) are judged as one")
    parser.add_argument("--calibrate", default="baby",
                        help="config whose 1-rank step calibrates the laptop here (default baby)")
    parser.add_argument("--from-rows", action="store_true",
                        help="then set each model's efficiency from its own measured 1-rank "
                             "rows, taken under the same conditions as the others")
    parser.add_argument("--no-colocation", action="store_true",
                        help="skip the 2-rank co-location probe (factor 1: ranks compute as "
                             "fast side by side as alone)")
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:  # one rank of the co-location probe, started by the driver
        worker = argparse.ArgumentParser(allow_abbrev=False)
        worker.add_argument("--worker", action="store_true")
        for flag in ("--batch", "--steps", "--phases"):
            worker.add_argument(flag, type=int, required=True)
        worker.add_argument("--config", required=True)
        return colocation_worker(worker.parse_args(argv))
    args = parser.parse_args(argv)
    rows = [row for path in args.measurements for row in read_rows(path)]
    stored = stored_calibration(rows)
    cluster = laptop_cluster(**stored) if stored else calibrate_laptop(args.calibrate)
    where = "by make report beside the rows (the median of its rounds)" if stored else \
        f"here on {args.calibrate}"
    print(f"laptop calibrated {where}: GEMM peak "
          f"{cluster.peak_flops / 1e9:.1f} GFLOP/s, step efficiency {cluster.efficiency:.2f}, "
          f"Python {cluster.layer_overhead * 1e3:.2f} ms per layer per micro-batch; links "
          f"{cluster.intra.latency * 1e6:.0f} us + bytes / {cluster.intra.bandwidth / 1e9:g} GB/s")
    fits = with_one_sequence(calibrated_on_rows(rows, cluster), rows, cluster) if args.from_rows \
        else {}
    if fits:
        print("from the measured 1-rank rows, a fixed cost per step and the efficiency at "
              "sequences per micro-batch: " + "; ".join(
                  f"{name} {fit.step_overhead * 1e3:.1f} ms, " + ", ".join(
                      f"{e:.2f} at {r}" for r, e in fit.efficiencies)
                  for name, fit in fits.items()))
    probes = {}
    if not args.no_colocation:
        probes = {row["model"]: {key: row.get(key) for key in PROBED} for row in rows
                  if row.get("colocated_slowdown")}
        where = "measured by make report beside the rows"
        if not probes:
            probes, where = measure_colocation(colocation_batches(rows)), "measured here"
        print(f"2 ranks side by side against 1 alone ({where}): " + "; ".join(
            f"{name} x{probe['colocated_slowdown']:.3f}" + "".join(
                f", {what} {probe[key][0] * 1e6:.0f} us + bytes / {probe[key][1] / 1e9:.2f} "
                "GB/s" for key, what in (("busy_link", "an all-reduce between busy ranks"),
                                         ("message_link", "a server's messages"))
                if probe.get(key)) for name, probe in probes.items()))
    cores = cluster.devices_per_node
    return 0 if check(rows, lambda row: cluster_for(row, cluster, fits, probes), cores) else 1


if __name__ == "__main__":
    sys.exit(main())
