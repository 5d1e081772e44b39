"""`make bench-ps` / `python -m bench.ps`: the parameter server against the ring on `baby`,
300 steps on the embedded corpus (issue 10's benchmark): synchronous and asynchronous
(bounded staleness k=2) pushes, one straggler, dynamic load balancing, and compressed
gradients (top-k, int8, PowerSGD) in both modes.

The driver (this process, idle while cases run) starts every case as its own training job,
`mpiexec -n 4 python -m app train --config baby --data data/embedded.h5 ...` (mpiexec beside
sys.executable; Open MPI gets --oversubscribe), one BLAS thread per rank, the Makefile's
MPICH yield settings, into a run directory of its own (temporary unless --out). Every case
trains the same model from the same seed on the same global batch of 12 sequences a step
(ring: 4 ranks x 3 rows; ps: 1 server + 3 workers x 4 rows; dynamic: 12 micro-batches of 1
row taken from server 0's counter), with validation only at the start and at the last step
(--eval-interval = --steps, the same validation windows for every case), no sample, no
checkpoints, a log line every 10 steps and --peak-gflops 100 (no GEMM probe). The cases:

    a            ring DP, 4 ranks
    b            ps sync: --mode ps --servers 1 (ranks 1-3 are workers)
    c            ps async: b + --staleness 2
    d-sync       b + --straggler 3:50 (worker rank 3 sleeps 50 ms every step)
    d-async      c + --straggler 3:50
    d-dynamic    c + --straggler 3:50 --balance dynamic --micro-batches 4
    f-sync       b + --straggler any:50 (each step one worker, drawn afresh, sleeps 50 ms)
    f-async      c + --straggler any:50
    e-ring-topk  a + --compress topk --compress-ratio 0.01   (and -int8, -powersgd r=4)
    e-ps-topk    b + the same                                (and -int8, -powersgd r=4)

Everything in the table but one column comes from each case's RUN/metrics.jsonl, as the
trainer logs it. `tok/s log` is the median of the logged `tokens_per_s` after the first log
line (step 0 holds the first step's set-up); in ps mode it is the logging rank's, the first
worker (rank 1): the global batch's tokens over its median step time. `tok/s wall` is the
driver's own measure of the same rank's throughput: the steps after step 0 times the global
batch's tokens, over the wall time between the step-0 and the last step log lines as they
reach the driver (validation is outside it). In async mode the logging worker may run up to
k steps ahead of the others, so its own step times say less about the job than the wall
clock does: the straggler targets are judged on `tok/s wall`; both numbers are printed.

bytes/step is the mean over the logged steps of the total of `bytes_sent` (the mean, so
that top-k's denser warm-up steps count): in ring mode
what the logging rank (rank 0, a worker like every rank) sent in its data-parallel
all-reduce, in ps mode what the first worker sent in its pushes and pull requests (the
servers' replies, the parameters, are not counted). `less` is the uncompressed case of the
same mode's bytes over the case's (a for the ring, b for ps). val loss is the final
validation loss; `vs ref` its ratio to a's (ring) or b's (ps, synchronous and uncompressed).
The staleness column sums the `staleness` histograms of an async run (pushes applied at
staleness 0, 1, 2, as server 0 counts them, over the whole run, every worker's).

After the table the driver checks issue 10's targets and prints PASS or FAIL for each, from
this one run (nothing is tuned to meet them): top-k sends >= 50x fewer bytes than the
uncompressed case of its mode with a final validation loss within 2% of it (ring and ps
separately); with the straggler, async beats sync in tok/s wall and dynamic beats both; async
k=2 ends within 3% of sync's validation loss. One line more is not a target: with a rotating
straggler (f-*), whose delays come and go, async should beat sync, since only a delay that
persists gates bounded staleness (README). It also says how the top-k reduction compares
with the literature's.

This machine is shared and has 2 cores, so 4 ranks oversubscribe it: tok/s measures the
machine as much as the method. The driver measures the CPU other processes use while each
case runs (bench.dp.LoadMeter) and prints it in the `load` column; with --reruns it runs a
case that others disturbed (over 0.15 cores) once more and keeps the quieter run.
`make bench-ps` runs 14 cases of about 25-40 s each: about 8 minutes.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.dp import LoadMeter
from bench.tp import job_env, mpiexec_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 4
BATCH = 12  # global: 4 ring ranks x 3 rows; 3 workers x 4 rows; 3 workers x 4 micro x 1 row
MAX_LOAD = 0.15

PS = ["--mode", "ps", "--servers", "1"]
ASYNC = PS + ["--staleness", "2"]
STRAGGLER = ["--straggler", "3:50"]
ROTATING = ["--straggler", "any:50"]  # each step one worker, drawn afresh, sleeps 50 ms
# top-k as DGC runs it: the kept fraction falls from 1 to 0.01 over the first third of the run
COMPRESS = {"topk": ["--compress", "topk", "--compress-ratio", "0.01", "--compress-warmup",
                     "100"],
            "int8": ["--compress", "int8"],
            "powersgd": ["--compress", "powersgd", "--compress-rank", "4"]}

# name, mode, what it is, flags
CASES = [
    ("a", "ring", "ring DP, 4 ranks", []),
    ("b", "ps", "ps sync, 1 server + 3 workers", PS),
    ("c", "ps", "ps async k=2", ASYNC),
    ("d-sync", "ps", "ps sync + straggler", PS + STRAGGLER),
    ("d-async", "ps", "ps async k=2 + straggler", ASYNC + STRAGGLER),
    ("d-dynamic", "ps", "ps async k=2, straggler, dynamic",
     ASYNC + STRAGGLER + ["--balance", "dynamic", "--micro-batches", "4"]),
    ("f-sync", "ps", "ps sync + rotating straggler", PS + ROTATING),
    ("f-async", "ps", "ps async k=2 + rotating straggler", ASYNC + ROTATING),
    *[(f"e-ring-{name}", "ring", f"ring DP, {label}", flags)
      for name, label, flags in [("topk", "topk 0.01", COMPRESS["topk"]),
                                 ("int8", "int8", COMPRESS["int8"]),
                                 ("powersgd", "powersgd r=4", COMPRESS["powersgd"])]],
    *[(f"e-ps-{name}", "ps", f"ps sync, {label}", PS + flags)
      for name, label, flags in [("topk", "topk 0.01", COMPRESS["topk"]),
                                 ("int8", "int8", COMPRESS["int8"]),
                                 ("powersgd", "powersgd r=4", COMPRESS["powersgd"])]],
]
NAMES = [case[0] for case in CASES]
REFERENCE = {"ring": "a", "ps": "b"}  # uncompressed, synchronous, no straggler


def select(spec):
    """--cases: comma-separated names or prefixes ('d' = every d-* case, 'e-ps' = every
    e-ps-* case); 'all' = every case. Kept in the table's order."""
    if spec == "all":
        return list(CASES)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    for w in wanted:
        if not any(n == w or n.startswith(w + "-") for n in NAMES):
            raise SystemExit(f"error: --cases: unknown case {w!r} (cases: {', '.join(NAMES)})")
    return [c for c in CASES if any(c[0] == w or c[0].startswith(w + "-") for w in wanted)]


def train_command(mpiexec, args, flags, out):
    return [*mpiexec, "-n", str(RANKS), sys.executable, "-m", "app", "train",
            "--config", args.config, "--data", args.data, "--out", out, "--overwrite",
            "--steps", str(args.steps), "--batch-size", str(BATCH), "--seed", str(args.seed),
            "--eval-interval", str(args.steps), "--sample-tokens", "0",
            "--peak-gflops", "100", "--log-interval", str(args.log_interval),
            "--save-interval", "0",
            *(["--eval-windows", str(args.eval_windows)] if args.eval_windows else []),
            *flags]


def read_metrics(path):
    """The case's row from RUN/metrics.jsonl (see the module docstring)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    vals = [r for r in records if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    histograms = [r["staleness"] for r in records if "staleness" in r]
    staleness = [sum(h[i] for h in histograms if i < len(h))
                 for i in range(max(map(len, histograms)))] if histograms else None
    return {"tok_s": statistics.median(rates) if rates else float("nan"),
            "bytes": statistics.fmean(sum(r["bytes_sent"].values()) for r in steps)
            if steps else float("nan"),
            "val_loss": vals[-1]["val_loss"] if vals else float("nan"),
            "first_val": vals[0]["val_loss"] if vals else float("nan"),
            "staleness": staleness, "logged": len(steps)}


STEP_LINE = re.compile(r"^step\s+(\d+)/\d+ \| loss ")


def stream(cmd, env, stderr, timeout, on_line=None):
    """Runs cmd (its own process group, killed whole after `timeout` s), reading its stdout
    as it comes: (exit status or None on timeout, [(step, time its log line arrived)]);
    `on_line(line)` sees every other line."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, start_new_session=True)
    expired = []

    def kill():
        expired.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            match = STEP_LINE.match(line)
            if match:
                seen.append((int(match.group(1)), time.perf_counter()))
            elif on_line is not None:
                on_line(line)
        proc.wait()
    finally:
        timer.cancel()
    return (None if expired else proc.returncode), seen


def row_tokens(args):
    from app.config import load_config
    return BATCH * load_config(args.config, {}).block_size


def run_case(mpiexec, args, case, root):
    name, mode, what, flags = case
    env = job_env()
    out = os.path.join(root, name)
    cmd = train_command(mpiexec, args, flags, out)
    start = time.perf_counter()
    with LoadMeter() as meter, tempfile.TemporaryFile("w+") as stderr:
        returncode, seen = stream(cmd, env, stderr, args.timeout)
        stderr.seek(0)
        tail = stderr.read().strip().splitlines()[-3:]
    failure = None if returncode == 0 else (
        f"over --timeout {args.timeout:g} s" if returncode is None
        else f"exit {returncode}: " + " | ".join(tail))
    wall = time.perf_counter() - start
    row = {"name": name, "mode": mode, "what": what, "flags": flags, "wall": wall,
           "load": meter.cores, "failure": failure, "run_tok_s": float("nan")}
    if len(seen) >= 2:  # the logging rank's steps first..last as the driver saw their lines
        (s0, t0), (s1, t1) = seen[0], seen[-1]
        row["run_tok_s"] = (s1 - s0) * row_tokens(args) / max(t1 - t0, 1e-9)
    if failure is None:
        try:
            row.update(read_metrics(os.path.join(out, "metrics.jsonl")))
        except (OSError, ValueError, KeyError) as e:
            row["failure"] = f"unreadable metrics.jsonl: {e}"
    status = row["failure"] or (f"{row['tok_s']:.0f} tok/s logged, {row['run_tok_s']:.0f} "
                                f"wall, {row['bytes']:,.0f} B/step, "
                                f"val loss {row['val_loss']:.4f}")
    print(f"  {name:<16} {status} (other processes {row['load']:.2f} cores, {wall:.1f} s)",
          file=sys.stderr)
    return row


def measure(mpiexec, args, case, root, budget):
    row = run_case(mpiexec, args, case, root)
    if row["failure"] is None and row["load"] > MAX_LOAD and budget["reruns"] > 0:
        budget["reruns"] -= 1
        again = run_case(mpiexec, args, case, root)
        if again["failure"] is None:
            row = min(row, again, key=lambda r: r["load"])
    return row


def fmt_ratio(value, digits=4, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def print_table(rows):
    by_name = {r["name"]: r for r in rows}
    head = (f"{'case':<16}{'what':<34}{'tok/s log':>10}{'tok/s wall':>11}{'bytes/step':>12}"
            f"{'less':>8}"
            f"{'val loss':>9}{'vs ref':>8}  {'staleness 0/1/2':<17}{'load':>5}{'wall s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["failure"]:
            print(f"{r['name']:<16}{r['what']:<34}FAILED: {r['failure']}")
            continue
        ref = by_name.get(REFERENCE[r["mode"]])
        ok_ref = ref is not None and not ref["failure"]
        less = ref["bytes"] / r["bytes"] if ok_ref and r["bytes"] else None
        loss = r["val_loss"] / ref["val_loss"] if ok_ref else None
        stale = "/".join(map(str, r["staleness"])) \
            if r["staleness"] and "--staleness" in r["flags"] else "-"
        print(f"{r['name']:<16}{r['what']:<34}{r['tok_s']:>10.0f}{r['run_tok_s']:>11.0f}"
              f"{r['bytes']:>12,.0f}"
              f"{fmt_ratio(less, 1, 'x'):>8}{r['val_loss']:>9.4f}{fmt_ratio(loss):>8}  "
              f"{stale:<17}{r['load']:>5.2f}{r['wall']:>7.1f}")


def check_targets(rows):
    """Issue 10's targets, PASS/FAIL lines (or 'not run' where a case is missing)."""
    ok = {r["name"]: r for r in rows if not r["failure"]}
    lines = []

    def line(passed, text):
        lines.append(f"{'PASS' if passed else 'FAIL'}  {text}")

    def missing(text, *names):
        absent = [n for n in names if n not in ok]
        if absent:
            lines.append(f"----  {text}: not measured ({', '.join(absent)} not run or failed)")
        return bool(absent)

    for mode, case in (("ring", "e-ring-topk"), ("ps", "e-ps-topk")):
        ref = REFERENCE[mode]
        text = f"topk 0.01, {mode}: >= 50x fewer bytes than {ref}, val loss within 2% of {ref}"
        if missing(text, ref, case):
            continue
        less = ok[ref]["bytes"] / ok[case]["bytes"]
        rel = ok[case]["val_loss"] / ok[ref]["val_loss"] - 1
        line(less >= 50 and abs(rel) <= 0.02,
             f"{text}: {less:.1f}x fewer ({ok[case]['bytes']:,.0f} vs {ok[ref]['bytes']:,.0f} "
             f"B/step), val loss {ok[case]['val_loss']:.4f} vs {ok[ref]['val_loss']:.4f} "
             f"({rel:+.2%})")
    text = "straggler: async (d-async) beats sync (d-sync) in tok/s wall"
    if not missing(text, "d-sync", "d-async"):
        a, s = ok["d-async"]["run_tok_s"], ok["d-sync"]["run_tok_s"]
        la, ls = ok["d-async"]["tok_s"], ok["d-sync"]["tok_s"]
        line(a > s, f"{text}: {a:.0f} vs {s:.0f} ({a / s:.2f}x); tok/s log {la:.0f} vs "
             f"{ls:.0f} ({la / ls:.2f}x)")
    text = "straggler: dynamic (d-dynamic) beats async and sync in tok/s wall"
    if not missing(text, "d-sync", "d-async", "d-dynamic"):
        d, a, s = [ok[n]["run_tok_s"] for n in ("d-dynamic", "d-async", "d-sync")]
        ld, la, ls = [ok[n]["tok_s"] for n in ("d-dynamic", "d-async", "d-sync")]
        line(d > a and d > s, f"{text}: {d:.0f} vs {a:.0f} and {s:.0f} ({d / a:.2f}x, "
             f"{d / s:.2f}x); tok/s log {ld:.0f} vs {la:.0f} and {ls:.0f}")
    text = "rotating straggler (not a target): async (f-async) beats sync (f-sync) in tok/s wall"
    if not missing(text, "f-sync", "f-async"):
        a, s = ok["f-async"]["run_tok_s"], ok["f-sync"]["run_tok_s"]
        line(a > s, f"{text}: {a:.0f} vs {s:.0f} ({a / s:.2f}x)")
    text = "async k=2 (c): final val loss within 3% of sync (b)"
    if not missing(text, "b", "c"):
        c, b = ok["c"]["val_loss"], ok["b"]["val_loss"]
        line(abs(c / b - 1) <= 0.03, f"{text}: {c:.4f} vs {b:.4f} ({c / b - 1:+.2%})")
    for text in lines:
        print(text)

    ours = [f"{mode} {ok[REFERENCE[mode]]['bytes'] / ok[case]['bytes']:.0f}x"
            for mode, case in (("ring", "e-ring-topk"), ("ps", "e-ps-topk"))
            if case in ok and REFERENCE[mode] in ok]
    print("literature: DGC (Lin et al. 2018) reports 270-600x less gradient traffic without "
          "loss of accuracy (top-0.1% with momentum correction, local clipping and warm-up); "
          "1-bit Adam (Tang et al. 2021) up to 5x less communication. Ours, topk 0.01 (at most "
          "100x by its ratio; 66x for one float32 message with 2-byte indices, half that "
          "again as a ring all-gather of 4 payloads): "
          + (", ".join(ours) if ours else "not measured") + ".")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.ps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baby")
    parser.add_argument("--data", default="data/embedded.h5")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cases", default="all",
                        help=f"comma-separated names or prefixes of: {', '.join(NAMES)}")
    parser.add_argument("--seed", type=int, default=1337, help="the same for every case")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="validation windows of every case (default: the config's)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one case may run before it counts as failed")
    parser.add_argument("--reruns", type=int, default=0,
                        help="most cases run again because other processes disturbed them")
    parser.add_argument("--out", default=None,
                        help="keep the run directories under OUT/CASE (default: temporary)")
    args = parser.parse_args(argv)
    cases = select(args.cases)
    args.data = os.path.abspath(args.data)
    if not os.path.exists(args.data):
        raise SystemExit(f"error: no {args.data}: make it with `python -m app prepare "
                         f"--input embedded --out {args.data}` (or `make data`)")
    mpiexec = mpiexec_command()
    started = time.perf_counter()
    budget = {"reruns": args.reruns}
    with tempfile.TemporaryDirectory(prefix="bench-ps-") as tmp:
        root = os.path.abspath(args.out) if args.out else tmp
        rows = [measure(mpiexec, args, case, root, budget) for case in cases]
    load = os.getloadavg()
    print(f"\nparameter server vs ring: {args.config}, {args.steps} steps, global batch "
          f"{BATCH}, {RANKS} ranks on {os.cpu_count()} cores (oversubscribed), seed "
          f"{args.seed}; validation at steps 0 and {args.steps}")
    print_table(rows)
    for note in (
            "tok/s log: median of the logged tokens_per_s after the first log line (a fast "
            "worker's own step, see --help)",
            "tok/s wall: the logging rank's steps after step 0 over the wall time between their "
            "log lines",
            "bytes/step: per worker and step, mean (ring: rank 0's all-reduce; ps: the first "
            "worker's pushes + pull requests); less: a's (ring) or b's (ps) over the case's",
            "vs ref: final val loss over a's (ring) or b's (ps); load: cores' worth of CPU "
            "other processes used meanwhile"):
        print(note)
    print()
    check_targets(rows)
    print(f"({len(rows)} cases in {time.perf_counter() - started:.0f} s; load average at the "
          f"end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    return 1 if any(r["failure"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
