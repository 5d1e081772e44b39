"""app/failures.py: every failure ends the whole job within seconds, with one readable line.

Each case runs a real job under `mpiexec -n 2` (or one process where no peer is involved) and
checks the exit status, the time from the failure to the end, and that stderr holds exactly
one line of ours and no traceback. The MPI runtime adds its own report when a rank aborts
(MPICH one line, Open MPI a box); `our_lines` leaves it out.
"""
import signal
import subprocess
import sys
import time

import pytest

from app_util import app, command, ENV, FAST, MPIEXEC, OPEN_MPI, our_lines, ROOT

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")

ENDS_WITHIN_S = 10  # from the failure to the end of the job


def assert_one_line(result, prefix, *fragments):
    assert "Traceback" not in result.stderr, result.stderr
    lines = our_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


FAILS_ON_RANK_1 = """
import sys, time
from mpi4py import MPI
from app.errors import UserError
from app.failures import run_guarded
comm = MPI.COMM_WORLD

def job():
    comm.Barrier()
    if comm.Get_rank() == 1:
        time.sleep(0.5)
        {failure}
    comm.allgather(None)  # rank 0 waits here for a peer that will never come
    time.sleep(60)

sys.exit(run_guarded(job))
"""


@pytest.mark.parametrize("failure, status, prefix, fragment", [
    ("raise UserError('bad batch at step 7')", 2, "error: rank 1: ", "bad batch at step 7"),
    ("raise MemoryError()", 2, "error: rank 1: ", "out of memory"),
    ("raise KeyError('oops')", 1, "internal error: rank 1: ", "KeyError"),
])
def test_an_error_on_one_rank_ends_every_rank_at_once(failure, status, prefix, fragment):
    script = FAILS_ON_RANK_1.format(failure=failure)
    start = time.monotonic()
    result = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-c", script], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == status, result.stderr
    assert elapsed < ENDS_WITHIN_S, (elapsed, result.stderr)
    if "KeyError" in failure:  # a bug keeps its traceback, and ends with the one line
        assert our_lines(result.stderr)[-1].startswith(prefix), result.stderr
        assert "Traceback" in result.stderr
    else:
        assert_one_line(result, prefix, fragment)


def test_unwritable_out_under_mpiexec_ends_with_one_line(tiny_h5, tmp_path):
    """Only rank 0 writes the run directory; the others learn of its failure in set-up."""
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "a_file" / "run"
    result = app("train", *FAST, "--data", tiny_h5, "--out", out, n=2, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.seconds < ENDS_WITHIN_S + 5, result.seconds  # + start-up of 2 ranks
    assert_one_line(result, "error: rank 0: ", f"--out {out}: cannot create the run directory")


def test_non_finite_loss_is_one_line_naming_the_step(tiny_h5, tmp_path):
    result = app("train", *FAST, "--steps", "20", "--lr", "1e9", "--grad-clip", "0",
                 "--data", tiny_h5, "--out", tmp_path / "run", n=2, timeout=60)
    assert result.returncode == 2, result.stderr
    assert_one_line(result, "error: loss or gradient norm not finite in 6 steps in a row "
                    "(last: loss ", " at step ", "expected a lower lr (now 1e+09)")


def test_config_that_cannot_fit_in_memory_is_refused_before_writing(tiny_h5, tmp_path):
    out = tmp_path / "run"
    result = app("train", *FAST, "--block-size", "20000", "--data", tiny_h5, "--out", out,
                 n=2, timeout=60)
    assert result.returncode == 2, result.stderr
    assert_one_line(result, "error: config needs at least ", "GiB of memory (2 ranks here)",
                    "is available", "block_size (now 20000)")
    assert not out.exists()


def test_ctrl_c_under_mpiexec_ends_the_job_with_one_line(tiny_h5, tmp_path):
    job = subprocess.Popen(command(2, "train", "--config", "tiny", "--steps", "100000",
                                   "--log-interval", "1", "--sample-tokens", "0",
                                   "--peak-gflops", "100", "--data", tiny_h5,
                                   "--out", tmp_path / "run"),
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        for line in job.stdout:  # until training is under way on every rank
            if "| loss " in line:
                break
        start = time.monotonic()
        job.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does to mpiexec
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    elapsed = time.monotonic() - start
    assert job.returncode != 0
    assert elapsed < ENDS_WITHIN_S, (elapsed, stderr)
    assert "Traceback" not in stderr, stderr
    if OPEN_MPI:  # its mpirun ends the ranks itself, and their output with them
        return
    lines = our_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), stderr


def test_damaged_data_read_by_one_rank_ends_the_job_with_one_line(tmp_path, monkeypatch):
    """Rank 1 alone reads a damaged chunk at step 0 while rank 0 goes on into the gradient
    all-reduce: it reports the file and tokens, and its abort ends rank 0 too."""
    from app import prepare as prepare_cmd
    from app.data import BatchLoader, TokenData
    from conftest import corpus_text
    from damage import damage_chunk
    monkeypatch.setattr(prepare_cmd, "CHUNK_TOKENS", 1024)
    (tmp_path / "text.txt").write_text(corpus_text(), encoding="utf-8")
    data = tmp_path / "chunked.h5"
    prepare_cmd.prepare([tmp_path / "text.txt"], data)
    window = 16 + 1  # FAST's block_size + 1
    with TokenData(data) as tokens:
        def chunks(starts):
            return {t // 1024 for s in starts for t in (s, s + window - 1)}
        for seed in range(100):  # a seed whose step 0 gives rank 1 a chunk of its own
            starts = BatchLoader(tokens, "train", 16, 8, seed).starts(0)
            only_rank_1 = sorted(chunks(starts[4:]) - chunks(starts[:4]))
            if only_rank_1:
                break
    damage_chunk(data, "train", only_rank_1[0])
    result = app("train", *FAST, "--seed", seed, "--data", data, "--out", tmp_path / "run",
                 n=2, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.seconds < ENDS_WITHIN_S + 5, result.seconds  # + start-up of 2 ranks
    assert_one_line(result, "error: rank 1: ", str(data), "cannot read train tokens [",
                    "the file may be damaged")
