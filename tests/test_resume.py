"""Resume from checkpoints in new `mpiexec` jobs: bit-exact in the same layout, and equal to
float tolerance in another layout (dp, pp, tp, schedule, ZeRO-1, sequence parallelism, the
parameter server).

Each case runs real jobs under `mpiexec -n 4` (or one process): an uninterrupted run of 10
steps that saves at step 5, then a new job that resumes from that checkpoint."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from app.prepare import prepare
from app_util import app, assert_user_error
from conftest import corpus_text

MODEL = ["--n-layer", "8", "--n-head", "4", "--n-embd", "16", "--block-size", "16",
         "--batch-size", "8", "--dtype", "float64", "--steps", "10", "--lr", "3e-3",
         "--warmup-steps", "2", "--eval-windows", "2", "--eval-interval", "100",
         "--sample-tokens", "0", "--peak-gflops", "100", "--log-interval", "1",
         "--check-interval", "0", "--save-interval", "5", "--keep", "0"]
LAYOUTS = {
    "dp4-zero": ["--zero", "1", "--micro-batches", "2"],
    "dp2-pp2": ["--pp", "2", "--micro-batches", "2"],
    "pp4-interleaved": ["--pp", "4", "--schedule", "interleaved", "--chunks", "2",
                        "--micro-batches", "4"],
    "one-process": ["--micro-batches", "2"],
    "tp4-sp": ["--tp", "4", "--sequence-parallel", "--micro-batches", "2"],
    "ps2": ["--mode", "ps", "--servers", "2", "--micro-batches", "2"],
}
RANKS = {"one-process": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    (d / "corpus.txt").write_text(corpus_text(4000), encoding="utf-8")
    prepare([d / "corpus.txt"], d / "data.h5")
    return d / "data.h5"


def train(layout, data, out, *extra):
    result = app("train", "--config", "tiny", *MODEL, *LAYOUTS[layout], "--data", data,
                 "--out", out, *extra, n=RANKS.get(layout, 4), timeout=180)
    assert result.returncode == 0, result.stderr
    return result


def results(run):
    """Losses by step from metrics.jsonl, and the final parameters."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    with h5py.File(run / "params.h5") as f:
        params = {name: f[name][()] for name in f}
    return losses, params


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Uninterrupted runs (that save at step 5 and 10) per layout, made once."""
    runs = {}

    def get(layout):
        if layout not in runs:
            runs[layout] = tmp_path_factory.mktemp(f"straight-{layout}")
            train(layout, data, runs[layout], "--overwrite")
        return runs[layout]
    return get


@pytest.mark.parametrize("layout", ["dp4-zero", "dp2-pp2", "ps2"])
def test_resume_in_the_same_layout_is_bit_exact(layout, data, straight, tmp_path):
    whole = straight(layout)
    train(layout, data, tmp_path / "resumed", "--resume",
          whole / "checkpoints" / "step_00000005")
    losses, params = results(tmp_path / "resumed")
    ref_losses, ref_params = results(whole)
    assert sorted(losses) == [5, 6, 7, 8, 9]
    assert losses == {s: ref_losses[s] for s in losses}  # bit for bit
    for name, value in ref_params.items():
        assert np.array_equal(params[name], value), name


@pytest.mark.parametrize("saved, resumed", [("dp2-pp2", "pp4-interleaved"),
                                            ("dp2-pp2", "dp4-zero"),
                                            ("dp2-pp2", "one-process"),
                                            ("dp4-zero", "dp2-pp2"),
                                            ("tp4-sp", "dp2-pp2"),
                                            ("dp2-pp2", "tp4-sp"),
                                            ("ps2", "dp4-zero"),
                                            ("dp2-pp2", "ps2")])
def test_resume_in_another_layout_continues_the_same_run(saved, resumed, data, straight,
                                                         tmp_path):
    whole = straight(saved)
    train(resumed, data, tmp_path / "resumed", "--resume",
          whole / "checkpoints" / "step_00000005")
    losses, params = results(tmp_path / "resumed")
    ref_losses, ref_params = results(whole)
    np.testing.assert_allclose([losses[s] for s in range(5, 10)],
                               [ref_losses[s] for s in range(5, 10)], rtol=1e-5)
    for name, value in ref_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-12, err_msg=name)


def test_auto_resume_appends_to_the_log_and_skips_a_damaged_checkpoint(data, straight,
                                                                      tmp_path):
    """A run stopped after its step-5 save continues with `--resume auto`; a damaged newer
    checkpoint is skipped with a one-line warning."""
    run = tmp_path / "run"
    shutil.copytree(straight("dp2-pp2"), run)
    (run / "params.h5").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:7]) + "\n")  # val 0, steps 0-5
    with open(run / "checkpoints" / "step_00000010" / "rank_00000.h5", "r+b") as f:
        f.truncate(2000)
    result = train("dp2-pp2", data, run, "--resume", "auto")
    assert result.stderr.splitlines() == [
        f"warning: skipping checkpoint {run}/checkpoints/step_00000010: rank_00000.h5 cannot "
        "be read (" + result.stderr.split("cannot be read (", 1)[1].splitlines()[0]]
    assert "resumed from" in result.stdout and "step_00000005 at step 5" in result.stdout
    losses, _ = results(run)
    assert sorted(losses) == list(range(10))  # 0-5 kept, 5-9 appended (5 twice, same value)


def test_a_checkpoint_of_another_model_is_refused_naming_the_field(data, straight, tmp_path):
    ckpt = straight("dp2-pp2") / "checkpoints" / "step_00000005"
    result = app("train", "--config", "tiny", *MODEL, "--n-embd", "32", "--data", data,
                 "--out", tmp_path / "run", "--resume", ckpt)
    assert_user_error(result, f"checkpoint {ckpt} was saved with n_embd = 16 but the config "
                              "says n_embd = 32: expected the model fields (n_layer, n_head, "
                              "n_embd, block_size, vocab_size, n_classes, pool, dtype) to "
                              "match")


def test_resume_refusals(data, tmp_path):
    both = app("train", "--config", "tiny", "--data", data, "--resume", "auto", "--overwrite")
    assert_user_error(both, "--resume and --overwrite together")
    run = tmp_path / "run"
    assert app("train", "--config", "tiny", *MODEL, "--save-interval", "0", "--data", data,
               "--out", run).returncode == 0
    again = app("train", "--config", "tiny", *MODEL, "--data", data, "--out", run,
                "--resume", "auto")
    assert_user_error(again, f"--out {run} holds a finished run but no checkpoint to resume",
                      "pass --overwrite")
    (run / "params.h5").unlink()  # stopped before its first checkpoint: starts again
    restarted = app("train", "--config", "tiny", *MODEL, "--data", data, "--out", run,
                    "--resume", "auto")
    assert restarted.returncode == 0, restarted.stderr
    assert "resumed" not in restarted.stdout
    assert sorted(results(run)[0]) == list(range(10))
    missing = app("train", "--config", "tiny", *MODEL, "--data", data, "--out", run,
                  "--resume", tmp_path / "nowhere")
    assert_user_error(missing, f"--resume {tmp_path / 'nowhere'}: no manifest.json")


@pytest.mark.parametrize("layout", ["dp2-pp2", "tp4-sp"])
def test_a_checkpoint_in_any_layout_reads_as_whole_parameters(layout, straight):
    """What export, eval and generate read with --checkpoint: the last checkpoint of a
    pipeline or tensor-parallel run holds exactly the final parameters, logical shapes."""
    from app.generate import load_run
    run = straight(layout)
    cfg, final, _ = load_run(run)
    cfg_ckpt, params, attrs = load_run(run, run / "checkpoints" / "step_00000010")
    assert cfg_ckpt.model_config() == cfg.model_config() and attrs["step"] == 10
    assert attrs["tokenizer"] == "bytes"
    for name, value in final.items():
        assert np.array_equal(params[name], value), name
    result = app("eval", "--run", run, "--checkpoint", run / "checkpoints" / "step_00000005")
    assert result.returncode == 0 and result.stdout.startswith("val loss "), result.stderr


@pytest.mark.parametrize("layout, victim", [("dp2-pp2", 2), ("ps2", 3)],
                         ids=["ring", "parameter-server-worker"])
def test_sigterm_to_one_rank_checkpoints_every_rank_and_the_resume_is_bit_exact(layout, victim,
                                                                               data, tmp_path):
    """SIGTERM reaches one rank only, mid-run: all ranks agree on a step (at the next step
    boundary; in ps mode the servers name it), save, and exit 75 ("requeue me"); `--resume
    auto` then finishes the run bit for bit as an uninterrupted one."""
    import signal
    import subprocess
    from app.preempt import REQUEUE_EXIT_CODE
    from app_util import command, ENV, ROOT
    from test_checkpoint_faults import rank_pids
    longer = ["--steps", "200", "--save-interval", "0"]
    train(layout, data, tmp_path / "whole", *longer)
    run = tmp_path / "run"
    job = subprocess.Popen(command(4, "train", "--config", "tiny", *MODEL, *LAYOUTS[layout],
                                   *longer, "--data", data, "--out", run),
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        for line in job.stdout:
            if line.startswith("step    20/"):
                break
        os.kill(rank_pids(str(run))[victim], signal.SIGTERM)  # one rank of the four
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == REQUEUE_EXIT_CODE, err
    assert "stopped by SIGTERM: checkpoint of step" in out, out
    train(layout, data, run, *longer, "--resume", "auto")
    losses, params = results(run)
    ref_losses, ref_params = results(tmp_path / "whole")
    assert losses == ref_losses
    for name, value in ref_params.items():
        assert np.array_equal(params[name], value), name
