"""bench/delay.py: its replay of a synchronous run is the trainer's run (so the late cases
differ from it only by lateness), and the driver prints its table."""
import subprocess
import sys

import pytest

from app.config import load_config
from app.trainer import train
from app_util import ENV, ROOT
from bench.delay import replay

STEPS, SEED = 4, 5


def test_the_synchronous_replay_is_the_trainers_run(tiny_h5, tmp_path):
    overrides = {"steps": STEPS, "batch_size": 12, "seed": SEED, "data": str(tiny_h5),
                 "eval_interval": STEPS, "sample_tokens": 0, "log_interval": 1}
    run = train(load_config("tiny", overrides), tmp_path / "run", peak_gflops=1.0,
                log=lambda *a: None)
    _, val = replay("sync", "tiny", str(tiny_h5), STEPS, SEED)
    assert val == pytest.approx(run["val"][STEPS], rel=1e-6)
    _, late = replay("delay 1", "tiny", str(tiny_h5), STEPS, SEED)
    assert late != pytest.approx(val, rel=1e-6)  # a late gradient changes the model


def test_driver_prints_every_case(tiny_h5):
    result = subprocess.run(
        [sys.executable, "-m", "bench.delay", "--config", "tiny", "--steps", "2",
         "--data", str(tiny_h5), "--jobs", "1"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line[:20].strip(): line.split()[-2:] for line in result.stdout.splitlines()[2:-1]}
    assert list(rows) == ["sync", "delay 1", "delay 1 + predict", "delay 2",
                          "delay 2 + predict", "mix", "mix + predict", "topk 0.1", "topk 0.01"]
    assert rows["sync"][1] == "1.0000"


def test_an_unknown_case_is_named():
    result = subprocess.run([sys.executable, "-m", "bench.delay", "--cases", "sync,nope"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "unknown case 'nope'" in result.stderr
