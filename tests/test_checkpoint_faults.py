"""Checkpoints under faults: one rank killed with SIGKILL at random moments of a job that
saves every step. The newest complete checkpoint always verifies and loads, and a partial
save is never picked by `--resume auto`."""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from app.checkpoint import find_resume, list_checkpoints, load_checkpoint, verify_checkpoint
from app_util import command, ENV, ROOT
from models import gpt
from models.optim import AdamW, decay_mask

KILLS = 10


def rank_pids(marker):
    """pids of the Python ranks whose command line holds `marker` (not mpiexec's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker.encode() in argv and b"-m" in argv and b"mpiexec" not in argv[0]:
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the ranks")
def test_kill_9_of_one_rank_never_loses_a_checkpoint(tiny_h5, tmp_path):
    rng = np.random.default_rng(7)
    partial_seen = 0
    for kill in range(KILLS):
        run = tmp_path / f"run{kill}"
        job = subprocess.Popen(
            command(2, "train", "--config", "tiny", "--steps", "100000", "--save-interval", "1",
                    "--keep", "3", "--log-interval", "1000", "--sample-tokens", "0",
                    "--peak-gflops", "100", "--data", tiny_h5, "--out", run),
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            for line in job.stdout:
                if "saved" in line:
                    break
            time.sleep(rng.uniform(0.0, 0.6))
            victim = rng.choice(rank_pids(str(run)))
            os.kill(int(victim), signal.SIGKILL)
            job.wait(timeout=60)
        finally:
            job.kill()
            job.communicate()
        partial_seen += any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
        warnings = []
        picked = find_resume(run, "auto", warnings.append)
        complete = list_checkpoints(run)
        assert picked is not None and picked == complete[0], (kill, complete, warnings)
        manifest = verify_checkpoint(picked)
        model = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)
        params = gpt.init_params(model, 0)
        optimizer = AdamW(params.flat, decay_mask(params, gpt.is_decayed))
        assert load_checkpoint(picked, params, optimizer) == manifest["step"]
        assert np.isfinite(params.flat).all()
    print(f"{KILLS} kills, {partial_seen} of them left a partial save behind; every newest "
          "complete checkpoint verified and loaded")
