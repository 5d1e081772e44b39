"""Running `python -m app ...` as a user does, on one process or under mpiexec, and run
directories as `app train` leaves them."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mpi4py import MPI

ROOT = Path(__file__).resolve().parents[1]
# One BLAS thread per rank and MPICH ranks that yield when idle, as `make` sets them.
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
       "MPIR_CVAR_POLLS_BEFORE_YIELD": os.environ.get("MPIR_CVAR_POLLS_BEFORE_YIELD", "10"),
       "MPIR_CVAR_POSIX_POLL_FREQUENCY": os.environ.get("MPIR_CVAR_POSIX_POLL_FREQUENCY", "10"),
       "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
MPIEXEC = Path(sys.executable).parent / "mpiexec"

# Fast training flags: the GEMM probe is skipped, no sampling, few validation windows.
FAST = ["--config", "tiny", "--steps", "2", "--sample-tokens", "0", "--eval-windows", "2",
        "--peak-gflops", "100", "--block-size", "16"]

OPEN_MPI = "Open MPI" in MPI.Get_library_version()
RUNTIME_LINE = re.compile(r"Abort\(\d+\) on node |\[[^]]*\] PMIX ERROR")


def our_lines(stderr):
    """stderr less what the MPI runtime adds when a rank aborts or exits non-zero: MPICH's
    line `Abort(2) on node 0 ...`, Open MPI's boxes between lines of dashes and PMIx notes."""
    lines, in_box = [], False
    for line in stderr.replace("\0", "").splitlines():
        if line.startswith("-----"):
            in_box = not in_box
        elif not in_box and line.strip() and not RUNTIME_LINE.match(line):
            lines.append(line)
    return lines


def command(n, *args):
    """The argv of `python -m app ARGS` on one process (n = 1) or n ranks of mpiexec."""
    prefix = []
    if n > 1:
        if not MPIEXEC.exists():
            pytest.skip(f"no mpiexec beside {sys.executable}")
        prefix = [str(MPIEXEC), "-n", str(n)]
    return prefix + [sys.executable, "-m", "app", *map(str, args)]


def app(*args, cwd=ROOT, n=1, timeout=120):
    """Runs the command to its end; the result has `.seconds`, its wall time, as well."""
    start = time.monotonic()
    result = subprocess.run(command(n, *args), cwd=cwd, env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    result.seconds = time.monotonic() - start
    return result


def mpiexec_app(n, *args, **kwargs):
    return app(*args, n=n, **kwargs)


def assert_user_error(result, *fragments, status=2):
    """Exit status 2, exactly one stderr line `error: ...` naming every fragment."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = our_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def write_run(path, params, model_cfg, **config):
    """A run directory as `app train` leaves it (config.toml, params.h5) for these params
    (a FlatParams or a dict) of `model_cfg`; `config` overrides other config keys."""
    from app.checkpoint import save_params
    from app.config import make_config
    cfg = make_config({"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head,
                       "n_embd": model_cfg.n_embd, "block_size": model_cfg.block_size,
                       "vocab_size": model_cfg.vocab_size, **config})
    path.mkdir()
    (path / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    save_params(path / "params.h5", dict(params.items()),
                {"step": 0, "tokenizer": "bytes", "config": cfg.to_toml()})
    return path
