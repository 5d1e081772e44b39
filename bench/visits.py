"""`mpiexec -n 2 python -m bench.visits SPEC.json`: make report's later rounds of its 1- and
2-rank rows, every row's `train()` called in turn inside one 2-rank MPI job.

A separate `mpiexec ... python -m app train` job of `baby` takes 3.5 s, of which its 20
steps are 1 s; the rest is starting MPI and Python. Called in a running job, the same
`app.trainer.train` (data, engine, validation, 20 steps) takes 0.8-1.1 s. This VM's speed
wanders by +-25% over seconds (a 1-rank `baby` step's per-second median read 23.4-45.8 ms
within one minute), so what makes a row repeatable is how many moments it is sampled at:
in the same time this samples each row three times as often as separate jobs would.

SPEC: {"data": path, "steps": S, "rounds": R, "first_round": r0, "total_rounds": n,
"run_dir": dir, "cases": [{"config": name, "overrides": {...}, "batch": B, "ranks": 1|2},
..., {"config": name, "batch": B, "colocation": true}, ...]}; the last kind is one pass of
the co-location probe (bench/costcheck.py `ColocationProbe`), whose visits give [alone ms,
together ms] instead: sampled in turn with the rows, it measures the factor at the moments
the rows are measured (the separate probe, run before each round, read 1.03-1.26 for
`baby` within one report).
Each round visits every case once, starting further along the list each time (round r0 + i
of n starts (r0 + i) / n of the way along, as make report's rounds of jobs do). A 2-rank
case trains on both ranks; a 1-rank case on rank 0 alone (COMM_SELF) while rank 1 sleeps
until it is done, leaving its core to it. Rank 0 prints one JSON line: for each case, one
list per visit of its logging rank's ms per step (metrics.jsonl `ms_per_step`, steps
1..S-1: with a log line every step, each step's own time), the numbers make report pools
with its first round's (`combine_rounds`).
"""
import json
import os
import sys
import traceback

from mpi4py import MPI

from app.config import load_config
from app.errors import UserError
from app.trainer import train
from bench.costcheck import ColocationProbe, sleep_until_everyone_arrives
from bench.report import logged_step_ms


def rotation(n, round_, total_rounds):
    """The order of round `round_` of `total_rounds` over n cases: starting round_ / total
    of the way along, so that a drift of the machine weighs on every case alike."""
    turn = round_ * n // total_rounds
    return list(range(turn, n)) + list(range(turn))


def visit(case, spec, comm, run_dir):
    """Trains one case on `comm`; every rank of `comm` returns once the run is written."""
    steps = spec["steps"]
    cfg = load_config(case["config"], {
        **case["overrides"], "batch_size": case["batch"], "steps": steps, "data": spec["data"],
        "eval_interval": steps, "eval_windows": 2, "sample_tokens": 0, "save_interval": 0,
        "log_interval": 1})
    train(cfg, run_dir, peak_gflops=100, log=lambda *args, **kwargs: None, comm=comm,
          overwrite=True)


def main(argv):
    with open(argv[0]) as f:
        spec = json.load(f)
    comm = MPI.COMM_WORLD
    rank, cases = comm.Get_rank(), spec["cases"]
    times = [[] for _ in cases]
    probes = {}
    for r in range(spec["rounds"]):
        for i in rotation(len(cases), spec["first_round"] + r, spec["total_rounds"]):
            case, run_dir = cases[i], os.path.join(spec["run_dir"], f"case{i}")
            if case.get("colocation"):
                key = (case["config"], case["batch"])  # one probe for its several passes
                if key not in probes:
                    probes[key] = ColocationProbe(case["config"], case["batch"], comm, 3)
                times[i].append(probes[key]())
                continue
            if case["ranks"] == 1:
                if rank == 0:
                    visit(case, spec, MPI.COMM_SELF, run_dir)
                sleep_until_everyone_arrives(comm)
            else:
                visit(case, spec, comm, run_dir)
                comm.Barrier()  # the logging rank (maybe rank 1) has closed metrics.jsonl
            if rank == 0:
                times[i].append(logged_step_ms(os.path.join(run_dir, "metrics.jsonl")))
    if rank == 0:
        print(json.dumps(times))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as err:  # the trainer raises these on every rank alike
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # one rank's error must end the job, not leave the other waiting
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
