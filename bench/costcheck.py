"""`python -m bench.costcheck --measurements FILE`: the cost model against measured steps.

FILE is the measurements.json that `make report` writes (bench/report.py): one dict per
measured configuration (model, mode, dp, tp, pp, schedule, chunks, micro_batches, zero,
servers, staleness, ranks, batch_size, block_size, step_ms, peak_mem_bytes, ...). For each
row this prints the cost model's step time and memory per rank on the laptop preset,
calibrated in this process (app/costmodel.py `calibrate_laptop`), beside the measured ones,
and judges the target: within 15% for every configuration of 1 or 2 ranks. Rows with more
ranks than cores are marked oversubscribed and left out of the judgement; load is the
cores' worth of CPU other processes used while the row was measured (bench/report.py).

Ranks that share the laptop's two cores compute slower than one rank alone: they share the
L3 cache and memory bandwidth, and ranks that exchange every step wait for the slower. That
factor (the cluster's colocated_slowdown) is measured here for each model, apart from every
judged row: `mpiexec -n 2` runs the model's 1-rank step (no communication) first on rank 0
alone, then on both ranks with a barrier after every step, in alternating phases so that the
machine's drift hits both alike; the factor is the median over phases of together / alone.

A parameter server is not in app/costmodel.py; here its workers are the data-parallel
ranks, and each step's exchange is a push and a pull through the servers' links, exposed
when synchronous and hidden behind compute when stale.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from app.config import load_config
from dataclasses import replace

from app.costmodel import OURS, TrainingLayout, calibrate_laptop, p2p_time, predict

TOLERANCE = 0.15
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


def calibrated_on_rows(rows, cluster):
    """Model name -> the cluster refitted to that model's measured 1-rank steps, taken under
    the same conditions as the other rows: with two batch sizes (make report's strong and
    weak tables) both the rate of its FLOPs and Python's overhead per layer, with one the
    rate alone. The 1-rank rows then match by construction."""
    singles = {}
    for row in rows:
        if row["ranks"] == 1 and row["mode"] == "ring":
            singles.setdefault(row["model"], {})[row["batch_size"]] = row
    clusters = {}
    for name, by_batch in singles.items():
        # step = compute / efficiency + layers * overhead + optimizer: linear in the two
        # unknowns 1/efficiency and overhead, read off predictions at two settings
        base = replace(cluster, efficiency=1.0, layer_overhead=0.0)
        equations = []
        for row in list(by_batch.values())[:2]:
            model, layout = model_and_layout(row)
            plain = predict(model, layout, base, OURS)
            layers = predict(model, layout, replace(base, layer_overhead=1.0), OURS).step_s \
                - plain.step_s
            equations.append((plain.compute_s, layers,
                              row["step_ms"] / 1e3 - (plain.step_s - plain.compute_s)))
        if len(equations) == 2:
            (a1, b1, c1), (a2, b2, c2) = equations
            inverse = (c1 * b2 - c2 * b1) / (a1 * b2 - a2 * b1)
            overhead = (c1 - a1 * inverse) / b1
        else:
            (a1, b1, c1), = equations
            inverse, overhead = (c1 - b1 * cluster.layer_overhead) / a1, cluster.layer_overhead
        clusters[name] = replace(cluster, efficiency=1 / inverse, layer_overhead=overhead)
    return clusters


def colocation_worker(args):
    """Under `mpiexec -n 2`: prints {"alone": [ms], "together": [ms]}, one median per phase."""
    import numpy as np
    from mpi4py import MPI

    from app.parallel.engine import TrainStep
    from comm.backend import keep_freed_host_memory
    from models import gpt

    comm, rank = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank()
    keep_freed_host_memory()
    cfg = load_config(args.config, {"batch_size": args.batch})
    model = cfg.model_config()
    step = TrainStep(model, gpt.init_params(model, cfg.seed, np, np.float32), cfg)
    x = np.random.default_rng(rank).integers(0, model.vocab_size, (args.batch, model.block_size))

    def timed(lockstep):
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step(x, x, cfg.lr)
            if lockstep:
                comm.Barrier()
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    def idle_until_everyone_arrives():
        request = comm.Ibarrier()
        while not request.Test():
            time.sleep(0.0005)  # the idle rank leaves its core to the working one

    for _ in range(2):
        step(x, x, cfg.lr)  # warm-up: allocations, caches, compiled kernels
    alone, together = [], []
    for _ in range(args.phases):
        if rank == 0:
            alone.append(timed(lockstep=False))
        idle_until_everyone_arrives()
        comm.Barrier()
        together.append(comm.allreduce(timed(lockstep=True), op=MPI.MAX))
    if rank == 0:
        print(json.dumps({"alone": alone, "together": together}))


def measure_colocation(models, steps=3, phases=5, timeout=300):
    """Model name -> (its 1-rank batch, together / alone) on 2 ranks of this machine."""
    from bench.tp import THREAD_ENV, YIELD_ENV, mpiexec_command

    env = {**os.environ, **THREAD_ENV}
    for key, value in YIELD_ENV.items():
        env.setdefault(key, value)
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
        factors[name] = ratios[len(ratios) // 2]
    return factors


def predict_row(row, cluster):
    """(step seconds, memory bytes per rank) the cost model gives a measured row."""
    prediction = predict(*model_and_layout(row), cluster, OURS)
    step = prediction.step_s
    if row["mode"] == "ps":
        # workers alone compute; each pushes its gradients and pulls the parameters, and
        # every worker's bytes pass through the servers' links
        gradient_bytes = prediction.memory["grads"] / (2 if row["micro_batches"] > 1 else 1)
        exchange = 2 * p2p_time(gradient_bytes * row["dp"] / row["servers"], cluster.intra)
        step += exchange if row["staleness"] == 0 else max(0.0, exchange - step)
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


def check(rows, cluster, out=print):
    """Prints the table and the judgement; True when every 1-2 rank row is within 15%.
    cluster: model name -> its calibrated cluster, None -> the one for the others."""
    out(f"{'model':<6} {'layout':<34} {'ranks':>5} | {'step ms':>8} {'pred':>8} {'ratio':>6} | "
        f"{'mem MiB':>8} {'pred':>8} {'ratio':>6} | load")
    judged = {"step time": [], "memory": []}
    for row in rows:
        step, memory = predict_row(row, cluster.get(row["model"], cluster[None]))
        measured_memory = row.get("peak_mem_bytes")
        oversubscribed = row["ranks"] > cluster[None].devices_per_node
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
    parser.add_argument("--measurements", required=True,
                        help="measurements.json written by `make report`")
    parser.add_argument("--calibrate", default="baby",
                        help="config whose 1-rank step calibrates the laptop here (default baby)")
    parser.add_argument("--from-rows", action="store_true",
                        help="then set each model's efficiency from its own measured 1-rank "
                             "row, taken under the same load as the others")
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
    rows = read_rows(args.measurements)
    cluster = calibrate_laptop(args.calibrate)
    print(f"laptop calibrated here on {args.calibrate}: GEMM peak "
          f"{cluster.peak_flops / 1e9:.1f} GFLOP/s, step efficiency {cluster.efficiency:.2f}, "
          f"Python {cluster.layer_overhead * 1e3:.2f} ms per layer per micro-batch; links "
          f"{cluster.intra.latency * 1e6:.0f} us + bytes / {cluster.intra.bandwidth / 1e9:g} GB/s")
    clusters = {None: cluster}
    if args.from_rows:
        clusters.update(calibrated_on_rows(rows, cluster))
        print("from the measured 1-rank rows: " + ", ".join(
            f"{name} {c.rate(OURS) / 1e9:.1f} GFLOP/s and {c.layer_overhead * 1e3:.2f} ms per "
            "layer" for name, c in clusters.items() if name))
    if not args.no_colocation:
        batches = {}
        for row in rows:
            if row["ranks"] == 1 and row["mode"] == "ring":
                batches[row["model"]] = min(row["batch_size"], batches.get(row["model"], 10 ** 9))
        factors = measure_colocation(batches)
        for name, factor in factors.items():
            clusters[name] = replace(clusters.get(name, cluster), colocated_slowdown=factor)
        print("2 ranks side by side, each step after a barrier, against 1 alone (measured here): "
              + ", ".join(f"{name} (batch {batches[name]}) x{factor:.3f}"
                          for name, factor in factors.items()))
    return 0 if check(rows, clusters) else 1


if __name__ == "__main__":
    sys.exit(main())
