"""Throughput accounting: model FLOPs, a GEMM peak probe, MFU, and the metrics.jsonl log."""
import json
import time

import numpy as np

from comm.backend import synchronize
from models import gemm


def flops_per_token(n_params: int, n_layer: int, block_size: int, n_embd: int) -> int:
    """Training FLOPs per token, the llm.c/PaLM estimate: 6N for the weights (forward 2N,
    backward 4N) plus 6·L·T·d for causal attention's scores and weighted sums."""
    return 6 * n_params + 6 * n_layer * block_size * n_embd


def measure_gemm_gflops(xp=np, n=512, seconds=0.25, dtype=np.float32) -> float:
    """The best sustained fp32 GEMM rate (GFLOP/s) of this process with its current BLAS
    threads (one thread under `make`): the denominator of MFU. It times the products the
    model uses (models/gemm.py: MKL or OpenBLAS on the CPU, CuPy's on a GPU)."""
    a = xp.ones((n, n), dtype)
    b = xp.ones((n, n), dtype)
    out = xp.empty((n, n), dtype)
    gemm.matmul(a, b, out=out)  # warm-up: threads, caches, cuBLAS handles
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(4):
            gemm.matmul(a, b, out=out)
        synchronize(xp)
        best = min(best, (time.perf_counter() - start) / 4)
        if time.perf_counter() > deadline:
            break
    return 2 * n ** 3 / best / 1e9


class MetricsLog:
    """One JSON object per line, in a file started afresh by each run (appended to by a run
    that resumes); each line is flushed so that a killed run keeps its log."""

    def __init__(self, path, append=False):
        self.path = path
        self.file = open(path, "a" if append else "w", encoding="utf-8") if path else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


def step_record(step, steps, eta, loss, lr, norm, step_times, comm_waits, tokens_per_step,
                flops_per_step, peak_gflops, bytes_sent):
    """(metrics.jsonl record, log line) of one logged step; clears the timing lists.
    Timings are medians over the steps since the last log line: robust to one slow step."""
    dt = float(np.median(step_times))
    tok_s = tokens_per_step / dt
    mfu = flops_per_step / dt / (peak_gflops * 1e9)
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
              "ms_per_step": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu,
              "bytes_sent": dict(bytes_sent)}
    line = (f"step {step:5d}/{steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
            f"{dt * 1e3:7.1f} ms | {tok_s:8.0f} tok/s | MFU {100 * mfu:5.1f}%")
    if comm_waits:
        record["comm_wait_ms"] = float(np.median(comm_waits)) * 1e3
        line += f" | comm wait {record['comm_wait_ms']:.1f} ms"
    line += f" | ETA {format_duration(eta)}"
    step_times.clear()
    comm_waits.clear()
    return record, line


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def footprint(engine) -> dict:
    """This rank's bytes: parameters, gradients (with the accumulation buffer), AdamW's
    moments, the most activations alive at once in the last step, and what it sent per
    step by kind (dp: gradient buckets; pp: activations, gradients and the tied wte; tp:
    the layers' collectives; ps: a worker's pushes and pull requests)."""
    grads = engine.grads.flat.nbytes + (engine.scratch.flat.nbytes if engine.scratch else 0)
    return {"params": engine.params.flat.nbytes, "grads": grads,
            "optimizer": (engine.optimizer.m.nbytes + engine.optimizer.v.nbytes
                          if engine.optimizer else 0),  # a parameter server's worker: none
            "activations": engine.peak_activation_bytes,
            **{f"sent_{kind}": n for kind, n in engine.bytes_sent.items()}}


def footprint_line(engine, comm) -> str:
    """The largest footprint over the ranks of `comm` (every rank must call it)."""
    everyone = comm.allgather(footprint(engine))
    most = {key: max(f[key] for f in everyone) for key in everyone[0]}
    mib = {key: value / 2 ** 20 for key, value in most.items()}
    sent = ", ".join(f"{key[5:]} {value:.2f} MiB" for key, value in mib.items()
                     if key.startswith("sent_"))
    return (f"memory per rank (the largest): parameters {mib['params']:.2f} MiB, gradients "
            f"{mib['grads']:.2f} MiB, optimizer {mib['optimizer']:.2f} MiB, activations at "
            f"the peak {mib['activations']:.2f} MiB; sent per step: {sent}")
