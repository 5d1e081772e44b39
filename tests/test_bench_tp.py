"""bench/tp.py: the whole driver on `tiny` (it starts its own mpiexec jobs on 1, 2 and 4
ranks), and its byte count against the formula where that can be done by hand."""
import subprocess
import sys

import pytest

from app_util import ENV, MPIEXEC, ROOT
from bench.tp import expected_bytes


def test_expected_bytes_follow_megatrons_count():
    # p=2: an all-reduce of n float32 sends 2(p-1)/p * n * 4 = 4n bytes per rank
    row = {"tp": 2, "n_layer": 3, "n_embd": 8, "block_size": 4, "batch_size": 2,
           "sp": False, "recompute": "none"}
    E, N = 2 * 4 * 8, 2 * 4
    layers, other, recompute = expected_bytes(row)
    assert layers == 4 * 3 * 4 * E
    # embedding and head: an all-reduce of E each; the maxima: an all-gather of p*N (half an
    # all-reduce's bytes); the sums: an all-reduce of 2N
    assert other == 2 * 4 * E + 4 * N + 4 * 2 * N
    assert recompute == 0
    sp_layers, sp_other, sp_recompute = expected_bytes({**row, "sp": True, "recompute": "full"})
    assert sp_layers == layers  # all-gather + reduce-scatter = one all-reduce
    assert sp_other == other + 4 * (3 * 6 * 8 + 2 * 8 + 4 * 8)  # LN/bias sums, ln_f, wpe
    assert sp_recompute == layers // 2


def test_driver_prints_the_tables():
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    result = subprocess.run(
        [sys.executable, "-m", "bench.tp", "--config", "tiny", "--steps", "2", "--warmup", "1",
         "--n-head", "4", "--batch-size", "4", "--reruns", "0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ms/step" in out and "meas/(l+o)" in out
    rows = {line[:10].strip().rstrip("*"): line for line in out.splitlines()
            if line.startswith("tp=")}
    assert {"tp=1", "tp=2", "tp=2 +SP", "tp=4", "tp=4 +SP"} <= set(rows)
    assert "1.0000" in rows["tp=2"]  # measured bytes == layers + other
    assert "recomputation at tp=2" in out and "full" in out
    assert "== layers + other (+ recompute) exactly" in out
