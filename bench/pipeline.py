"""`make bench-pipeline`: pipeline schedules on real ranks against the simulator.

Run as `mpiexec -n P python -m bench.pipeline` (the make target runs P=2, then P=4, which
oversubscribes 2 cores: its bubbles measure the machine, not the schedule). For GPipe,
1F1B and interleaved 1F1B (2 chunks) at m = 4, 8, 16 micro-batches of 2 sequences, it
reports time per step and tokens/s, the bubble measured from per-rank instruction timers
(idle / total over the forward-backward part) against the simulator's prediction from the
same run's mean forward and backward times per stage, and the peak activation bytes per
stage. It also writes one run's timeline as a Chrome trace (runs/pipeline_trace_pP.json,
for Perfetto or chrome://tracing) and, if matplotlib is importable, a PNG Gantt chart.
`--help` lists the knobs (config, blocks, micro-batches, steps, output directory).
"""
import argparse
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from app.config import load_config
from app.parallel.engine import PipelineStep, make_program
from app.parallel.schedules import Backward, Forward, simulate
from comm.backend import keep_freed_host_memory

ROWS = 2  # sequences per micro-batch
TRACE_SCHEDULE = "1f1b"  # the timeline drawn: 1F1B at the middle number of micro-batches


def run_case(comm, cfg, schedule, m, steps, warmup):
    chunks = 2 if schedule == "interleaved" else 1
    options = cfg.__class__(**{**vars(cfg), "micro_batches": m})
    step = PipelineStep(cfg.model_config(), options, comm, None, schedule, chunks,
                        np.float32, np, cfg.seed, timeout=120)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (ROWS * m, cfg.block_size))
    rows = []
    for s in range(warmup + steps):
        comm.Barrier()
        step(x, x, 1e-4)
        if s < warmup:
            continue
        trace = step.trace
        compute = [(t, b - a) for t, a, b in trace if t.startswith(("Forward", "Backward"))]
        last_backward = max(b for t, a, b in trace if t.startswith("Backward"))
        rows.append({
            "wall": trace[-1][2], "pipeline_end": last_backward,
            "busy": sum(d for _, d in compute),
            "forward": np.mean([d for t, d in compute if t.startswith("Forward")]) * chunks,
            "backward": np.mean([d for t, d in compute if t.startswith("Backward")]) * chunks,
        })
    mine = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
    mine["peak_bytes"] = step.peak_activation_bytes
    mine["trace"] = step.trace
    return mine, chunks


def predict(p, m, chunks, schedule, forward, backward):
    program = [make_program(schedule, p, m, chunks, s) for s in range(p)]
    costs = {Forward: [f / chunks for f in forward], Backward: [b / chunks for b in backward]}
    return simulate(program, costs).bubble_fraction


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpiexec -n P python -m bench.pipeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="baby")
    parser.add_argument("--n-layer", type=int, default=8, help="blocks (a multiple of 2P)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--out", default="runs", help="directory of the trace and chart")
    args = parser.parse_args(argv)
    keep_freed_host_memory()
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    cfg = load_config(args.config, {"n_layer": args.n_layer})
    micro = args.micro_batches
    if any(m < 1 or m % p for m in micro) or cfg.n_layer % (2 * p):
        parser.error(f"--micro-batches {' '.join(map(str, micro))} and --n-layer "
                     f"{cfg.n_layer} on {p} ranks: expected micro-batches that are multiples "
                     f"of {p} and blocks a multiple of {2 * p} (interleaving: 2 chunks a rank)")
    trace_case = (TRACE_SCHEDULE, micro[len(micro) // 2])
    table = []
    for schedule in ("gpipe", "1f1b", "interleaved"):
        for m in micro:
            mine, chunks = run_case(comm, cfg, schedule, m, args.steps, args.warmup)
            everyone = comm.gather(mine, root=0)
            if rank != 0:
                continue
            makespan = max(r["pipeline_end"] for r in everyone)
            measured = 1 - sum(r["busy"] for r in everyone) / (p * makespan)
            predicted = predict(p, m, chunks, schedule, [r["forward"] for r in everyone],
                                [r["backward"] for r in everyone])
            wall = max(r["wall"] for r in everyone)
            table.append((schedule, m, wall * 1e3, ROWS * m * cfg.block_size / wall,
                          measured, predicted, everyone[0]["peak_bytes"] / 2**20))
            if (schedule, m) == trace_case:
                write_trace(everyone, p, m, args.out)
    if rank == 0:
        print_table(p, table, cfg, micro)


def print_table(p, table, cfg, micro):
    note = f" (oversubscribed: {p} ranks on {os.cpu_count()} cores)" \
        if p > os.cpu_count() else ""
    print(f"pipeline schedules, p={p}{note}: {cfg.n_layer} blocks of width {cfg.n_embd}, "
          f"micro-batches of {ROWS}x{cfg.block_size} tokens, float32")
    print(f"{'schedule':<12}{'m':>3} {'ms/step':>8} {'tok/s':>7} | {'bubble':>7} "
          f"{'predicted':>9} {'diff':>6} | {'peak act MB, stage 0':>20}")
    for schedule, m, ms, tok, measured, predicted, peak in table:
        print(f"{schedule:<12}{m:>3} {ms:>8.1f} {tok:>7.0f} | {100 * measured:>6.1f}% "
              f"{100 * predicted:>8.1f}% {100 * (measured - predicted):>+5.1f} | {peak:>20.2f}")
    peaks = {(s, m): peak for s, m, *_, peak in table}
    for m in micro:
        ratio = peaks["1f1b", m] / peaks["gpipe", m]
        print(f"1F1B / GPipe peak activations at m={m}: {ratio:.2f} (p/m = {p / m:.2f})")


def write_trace(everyone, p, m, out):
    os.makedirs(out, exist_ok=True)
    events = [{"name": name, "ph": "X", "ts": start * 1e6, "dur": (end - start) * 1e6,
               "pid": 0, "tid": rank, "cat": name.split("(")[0]}
              for rank, r in enumerate(everyone) for name, start, end in r["trace"]]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                "args": {"name": f"stage {rank}"}} for rank in range(p)]
    path = os.path.join(out, f"pipeline_trace_p{p}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"traceEvents": events}, f)
    os.replace(path + ".tmp", path)
    print(f"(timeline of 1f1b, m={m}: {path}", end="")
    gantt = os.path.join(out, f"pipeline_gantt_p{p}.png")
    try:
        draw_gantt(everyone, p, m, gantt)
        print(f"; Gantt chart {gantt})")
    except ImportError:
        print("; pip install matplotlib for a PNG Gantt chart)")


def draw_gantt(everyone, p, m, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"Forward": "tab:blue", "Backward": "tab:orange"}
    fig, ax = plt.subplots(figsize=(11, 0.7 * p + 1.2))
    for rank, r in enumerate(everyone):
        for name, start, end in r["trace"]:
            kind = name.split("(")[0]
            colour = colours.get(kind, "lightgrey")
            ax.barh(rank, (end - start) * 1e3, left=start * 1e3, color=colour,
                    edgecolor="white", linewidth=0.3)
            if kind in colours:
                ax.text((start + end) / 2 * 1e3, rank, name[len(kind) + 1:-1], ha="center",
                        va="center", fontsize=6, color="white")
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"1F1B, {p} stages, {m} micro-batches: forward (blue), backward (orange), "
                 "transfers and optimizer (grey)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    sys.exit(main())
