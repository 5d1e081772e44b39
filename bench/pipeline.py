"""`make bench-pipeline`: pipeline schedules on real ranks against the simulator.

Run as `mpiexec -n P python -m bench.pipeline` (the make target runs P=2, then P=4, which
oversubscribes 2 cores: its bubbles measure the machine, not the schedule). For GPipe,
1F1B and interleaved 1F1B (2 chunks) at m = 4, 8, 16 micro-batches of 2 sequences, it
reports time per step and tokens/s, the bubble measured from per-rank instruction timers
(idle / total over the forward-backward part) against the simulator's prediction from the
same run's mean forward and backward times per stage, and the peak activation bytes per
stage. It also writes one run's timeline as a Chrome trace (runs/pipeline_trace.json, for
Perfetto or chrome://tracing) and, if matplotlib is importable, a PNG Gantt chart.
"""
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
STEPS, WARMUP = 6, 2
TRACE_CASE = ("1f1b", 8)


def run_case(comm, cfg, schedule, m):
    chunks = 2 if schedule == "interleaved" else 1
    options = cfg.__class__(**{**vars(cfg), "micro_batches": m})
    step = PipelineStep(cfg.model_config(), options, comm, None, schedule, chunks,
                        np.float32, np, cfg.seed, timeout=120)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (ROWS * m, cfg.block_size))
    rows = []
    for s in range(WARMUP + STEPS):
        comm.Barrier()
        step(x, x, 1e-4)
        if s < WARMUP:
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


def main():
    keep_freed_host_memory()
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    cfg = load_config("baby", {"n_layer": 8})
    table = []
    for schedule in ("gpipe", "1f1b", "interleaved"):
        for m in (4, 8, 16):
            mine, chunks = run_case(comm, cfg, schedule, m)
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
            if (schedule, m) == TRACE_CASE:
                write_trace(everyone, p)
    if rank == 0:
        print_table(p, table)


def print_table(p, table):
    note = " (oversubscribed: 4 ranks on 2 cores)" if p > os.cpu_count() else ""
    print(f"pipeline schedules, p={p}{note}: baby with 8 blocks, micro-batches of {ROWS}x64 "
          "tokens, float32")
    print(f"{'schedule':<12}{'m':>3} {'ms/step':>8} {'tok/s':>7} | {'bubble':>7} "
          f"{'predicted':>9} {'diff':>6} | {'peak act MB, stage 0':>20}")
    for schedule, m, ms, tok, measured, predicted, peak in table:
        print(f"{schedule:<12}{m:>3} {ms:>8.1f} {tok:>7.0f} | {100 * measured:>6.1f}% "
              f"{100 * predicted:>8.1f}% {100 * (measured - predicted):>+5.1f} | {peak:>20.2f}")
    peaks = {(s, m): peak for s, m, *_, peak in table}
    for m in (4, 8, 16):
        ratio = peaks["1f1b", m] / peaks["gpipe", m]
        print(f"1F1B / GPipe peak activations at m={m}: {ratio:.2f} (p/m = {p / m:.2f})")


def write_trace(everyone, p):
    os.makedirs("runs", exist_ok=True)
    events = [{"name": name, "ph": "X", "ts": start * 1e6, "dur": (end - start) * 1e6,
               "pid": 0, "tid": rank, "cat": name.split("(")[0]}
              for rank, r in enumerate(everyone) for name, start, end in r["trace"]]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                "args": {"name": f"stage {rank}"}} for rank in range(p)]
    path = f"runs/pipeline_trace_p{p}.json"
    with open(path + ".tmp", "w") as f:
        json.dump({"traceEvents": events}, f)
    os.replace(path + ".tmp", path)
    print(f"(timeline of 1f1b, m=8: {path}", end="")
    try:
        draw_gantt(everyone, p, f"runs/pipeline_gantt_p{p}.png")
        print(f"; Gantt chart runs/pipeline_gantt_p{p}.png)")
    except ImportError:
        print("; pip install matplotlib for a PNG Gantt chart)")


def draw_gantt(everyone, p, path):
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
    ax.set_title(f"1F1B, {p} stages, 8 micro-batches: forward (blue), backward (orange), "
                 "transfers and optimizer (grey)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    sys.exit(main())
