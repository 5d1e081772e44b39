"""Throughput accounting: model FLOPs, a GEMM peak probe, MFU, and the metrics.jsonl log."""
import json
import time

import numpy as np


def flops_per_token(n_params: int, n_layer: int, block_size: int, n_embd: int) -> int:
    """Training FLOPs per token, the llm.c/PaLM estimate: 6N for the weights (forward 2N,
    backward 4N) plus 6·L·T·d for causal attention's scores and weighted sums."""
    return 6 * n_params + 6 * n_layer * block_size * n_embd


def measure_gemm_gflops(xp=np, n=512, seconds=0.25, dtype=np.float32) -> float:
    """The best sustained fp32 GEMM rate (GFLOP/s) of this process with its current BLAS
    threads (one thread under `make`): the denominator of MFU."""
    a = xp.ones((n, n), dtype)
    b = xp.ones((n, n), dtype)
    out = xp.empty((n, n), dtype)
    xp.matmul(a, b, out=out)  # warm-up: threads, caches, cuBLAS handles
    sync = synchronizer(xp)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(4):
            xp.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - start) / 4)
        if time.perf_counter() > deadline:
            break
    return 2 * n ** 3 / best / 1e9


def synchronizer(xp):
    if xp is np:
        return lambda: None
    return xp.cuda.runtime.deviceSynchronize


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
