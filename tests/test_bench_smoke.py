"""Every `make bench*` entry point runs end to end on `tiny` for a step or two and prints its
table, so that no benchmark rots unnoticed (bench-ps, bench-tp and bench-delay have their
own tests: test_bench_ps.py, test_bench_tp.py, test_bench_delay.py). Timings here mean
nothing; the tests check that each driver finishes and reports every row it promises."""
import subprocess
import sys

import pytest

from app_util import ENV, MPIEXEC, ROOT


def run(*argv, ranks=1, timeout=180):
    prefix = []
    if ranks > 1:
        if not MPIEXEC.exists():
            pytest.skip(f"no mpiexec beside {sys.executable}")
        prefix = [str(MPIEXEC), "-n", str(ranks)]
    result = subprocess.run([*prefix, sys.executable, "-m", *argv], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def torch_importable():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def test_model_speed_table():  # make bench
    out = run("bench.model", "--configs", "tiny", "--threads", "1", "--steps", "2",
              "--rounds", "1", "--two-core-rounds", "1", "--two-core-steps", "1", "0")
    from models import gemm
    bf16 = gemm.bf16_unavailable() is None  # then a bf16 table and bf16 2-core cells
    torch = torch_importable()
    row = [line for line in out.splitlines() if line.startswith("tiny")]
    assert len(row) == 1 + bf16 and "%" in row[0], out
    two_core = [line.split()[0] for line in out.splitlines() if "thread" in line]
    assert "2 cores, tiny" in out and two_core[:3] == ["ours"] * 3, out
    if torch:  # the PyTorch half: the same model and batch, a ratio
        assert "ours/torch" in out and row[0].rstrip().endswith("x"), out
        assert "first-step loss differs by at most" in out, out
        assert two_core[3:5] == ["torch", "torch"] and "best ours / best torch" in out, out
    if bf16:
        assert "bf16 products" in out and row[1].rstrip().endswith("x"), out
        assert two_core[3 + 2 * torch:] == ["ours"] + ["torch", "torch"] * torch, out
        assert torch == ("with bf16 products: best ours / best torch float32" in out), out


def test_data_parallel_scaling_table():  # make bench-dp
    out = run("bench.dp", "--quick", "--steps", "2", "--warmup", "1", "--rounds", "1",
              "--no-paired", "--budget", "30", "--quiet-wait", "0", "--sweep",
              *([] if torch_importable() else ["--no-torch"]))
    assert "DP weak scaling" in out, out
    impls = [line.split()[0] for line in out.splitlines() if line[:1].isalpha()]
    assert impls.count("ours") >= 3, out  # 1 rank, 2 ranks with and without overlap


@pytest.mark.parametrize("ranks", [2, 4])
def test_ring_against_mpi_table(ranks):  # make bench-comm
    out = run("bench.comm", "--sizes", "4K", "64K", "--rounds", "1", "--seconds", "0.05",
              ranks=ranks)
    sizes = [line.split()[0] for line in out.splitlines() if line.strip().endswith("x")]
    assert sizes == ["4K", "64K"], out


def test_checkpoint_table(tiny_h5):  # make bench-checkpoint
    out = run("bench.checkpoint", "--config", "tiny", "--rounds", "1", "--steps", "2",
              "--data", str(tiny_h5), ranks=4)
    assert out.count("sharded") >= 2 and "one-file" in out, out
    assert "with --save-interval" in out, out


@pytest.mark.parametrize("ranks", [2, 4])
def test_pipeline_table_and_trace(ranks, tmp_path):  # make bench-pipeline
    out = run("bench.pipeline", "--config", "tiny", "--n-layer", str(2 * ranks),
              "--micro-batches", str(ranks), str(2 * ranks), "--steps", "1", "--warmup", "0",
              "--out", str(tmp_path), ranks=ranks)
    schedules = [line.split()[0] for line in out.splitlines()
                 if line.split() and line.split()[0] in ("gpipe", "1f1b", "interleaved")]
    assert schedules == ["gpipe"] * 2 + ["1f1b"] * 2 + ["interleaved"] * 2, out
    assert (tmp_path / f"pipeline_trace_p{ranks}.json").exists()
