"""app/finetune.py, app/pretrained.py and app/classify.py: a `tiny` GPT pre-trained for a
few steps, fine-tuned on a synthetic labelled corpus (label: whether a marker byte '#'
appears); under `mpiexec -n 4` fine-tuning in DP=4 with ZeRO-1 and DP=2 x PP=2 equals the
single process (float64, rtol 1e-5)."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from app.checkpoint import list_checkpoints, load_params, read_checkpoint_params
from app.classify import BEST, scores
from app.classify_data import prepare_classify
from app.config import make_config
from app.errors import UserError
from app.finetune import finetune
from app.pretrained import initial_params, read_pretrained
from app.trainer import train
from tests.app_util import app, assert_user_error, command, ENV, ROOT
from tests.conftest import corpus_text
from tests.mpi_util import Verdict, groups_of, shared_tmpdir, skip_unless_ranks

MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


def write_marks(path, rows=240, seed=0):
    """JSONL rows of 4-14 letters, label "yes" exactly when one of them is '#'."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            chars = list(rng.choice(list("abcdefgh"), rng.integers(4, 15)))
            if i % 2:
                chars[rng.integers(len(chars))] = "#"
            f.write(json.dumps({"text": "".join(chars), "label": "yes" if i % 2 else "no"})
                    + "\n")
    return path


def make_inputs(root, comm=None):
    """(a pre-trained run directory, a labelled data file) under `root`, pre-trained on the
    ranks of `comm` (default: all)."""
    (root / "lm.txt").write_text(corpus_text(), encoding="utf-8")
    from app.prepare import prepare
    prepare([root / "lm.txt"], root / "lm.h5", tokenizer="bytes", val_fraction=0.1)
    lm = make_config({**MODEL, "batch_size": 8, "steps": 4, "data": str(root / "lm.h5"),
                      "eval_windows": 2, "sample_tokens": 0, "save_interval": 4, "seed": 2})
    train(lm, root / "pre", peak_gflops=100, log=lambda *a: None, comm=comm)
    prepare_classify(write_marks(root / "marks.jsonl"), root / "marks.h5", max_len=16,
                     val_fraction=0.15, test_fraction=0.15)
    return root / "pre", root / "marks.h5"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("finetune"))


def config(data, **changes):
    return make_config({**MODEL, "batch_size": 16, "steps": 60, "lr": 3e-3, "min_lr": 3e-4,
                        "warmup_steps": 5, "eval_interval": 20, "log_interval": 10,
                        "pool": "mean", "data": str(data), "seed": 1, **changes})


# --------------------------------------------------------------------------- one process


def test_trunk_is_the_pretrained_model_and_the_head_starts_at_zero(inputs):
    run, _ = inputs
    cfg, pretrained, tokenizer = read_pretrained(run)
    assert tokenizer == "bytes"
    saved, _ = load_params(run / "params.h5")
    classifier = make_config({**MODEL, "n_classes": 2}).model_config()
    params, copied = initial_params(classifier, 0, pretrained)
    assert sorted(copied) == sorted(saved)
    for name in saved:
        np.testing.assert_array_equal(params[name], saved[name], err_msg=name)
    assert not params["cls.weight"].any() and not params["cls.bias"].any()
    # a checkpoint of the run, into a shorter context: wpe keeps its first positions
    checkpoint = list_checkpoints(run)[0]
    _, from_checkpoint, _ = read_pretrained(checkpoint)
    shorter = make_config({**MODEL, "block_size": 8, "n_classes": 2}).model_config()
    params, _ = initial_params(shorter, 0, from_checkpoint)
    np.testing.assert_array_equal(params["wpe"], read_checkpoint_params(checkpoint)[1]["wpe"][:8])


def test_scores_accuracy_and_macro_f1():
    # truths 0,0,1,1,2 predicted 0,1,1,1,0: F1 per class 0.5, 0.8, 0 (class 2 occurs)
    confusion = np.zeros((3, 3))
    for truth, guess in ((0, 0), (0, 1), (1, 1), (1, 1), (2, 0)):
        confusion[truth, guess] += 1
    found = scores(np.append(confusion.reshape(-1), 2.5), 3)
    assert found["accuracy"] == pytest.approx(0.6) and found["loss"] == pytest.approx(0.5)
    assert found["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_finetune_learns_keeps_the_best_and_classifies(inputs, tmp_path):
    run, data = inputs
    out = tmp_path / "ft"
    lines = []
    history = finetune(config(data), out, init=run, log=lines.append)
    accuracies = {step: found["accuracy"] for step, found in history["val"].items()}
    assert accuracies[0] == pytest.approx(0.5)  # the zero head: one class for every row
    assert max(accuracies.values()) >= 0.75, accuracies  # chance is 0.5
    assert history["test"]["accuracy"] >= 0.65, history["test"]
    best = max(accuracies, key=lambda s: (accuracies[s], -s))  # the first of the highest
    with h5py.File(out / BEST, "r") as f:
        assert f.attrs["step"] == best
        assert f.attrs["val_accuracy"] == pytest.approx(accuracies[best])
        assert json.loads(f.attrs["labels"]) == ["no", "yes"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_macro_f1" in r] == [0, 20, 40, 60]
    assert records[-1]["best_step"] == best and "test_accuracy" in records[-1]
    assert any(line.startswith("test (36 rows, best.h5 of step") for line in lines)
    result = app("classify", "--run", out, "--text", "ab#cdefg")
    assert result.returncode == 0, result.stderr
    label, probability = result.stdout.split()
    assert label in ("no", "yes") and 0.5 <= float(probability) <= 1.0
    assert_user_error(app("eval", "--run", out), "holds a 2-way classifier")


def test_resume_continues_from_the_run_own_checkpoint(inputs, tmp_path):
    """Stopped after step 5's checkpoint, `--resume auto` ends where the whole run did, and
    best.h5 (of an earlier job) is kept unless beaten."""
    run, data = inputs
    cfg = config(data, steps=10, eval_interval=5, save_interval=5, keep=0, dtype="float64")
    whole = finetune(cfg, tmp_path / "ft", init=run, log=lambda *a: None)
    with h5py.File(tmp_path / "ft" / BEST, "r") as f:
        best_step = int(f.attrs["step"])
    for path in list_checkpoints(tmp_path / "ft")[:1]:  # step 10's: as if killed before it
        shutil.rmtree(path)
    lines = []
    resumed = finetune(cfg, tmp_path / "ft", init=run, log=lines.append, resume="auto")
    assert any(line.startswith("resumed from") and "step_00000005" in line for line in lines)
    assert resumed["loss"] == whole["loss"][5:]
    np.testing.assert_array_equal(resumed["params"].flat, whole["params"].flat)
    with h5py.File(tmp_path / "ft" / BEST, "r") as f:
        assert int(f.attrs["step"]) == best_step


def test_bad_inputs_are_one_line(inputs, tmp_path):
    run, data = inputs
    (tmp_path / "empty.h5").write_bytes(b"")
    cases = [
        (["--data", tmp_path / "empty.h5"], ["empty.h5", "cannot be read as HDF5"]),
        (["--data", run.parent / "lm.h5"], ["gpt-tokens", "expected 'gpt-classify'"]),
        (["--n-embd", 64], ["n_embd = 32", "n_embd = 64", "expected the same n_embd"]),
    ]
    for flags, fragments in cases:
        result = app("finetune", "--config", "tiny", "--block-size", 16, "--data", data,
                     "--init", run, "--out", tmp_path / "out", *flags)
        assert_user_error(result, *fragments)
        assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="max_len 16 but the config says block_size = 8"):
        finetune(config(data, block_size=8), tmp_path / "short", init=run)
    with pytest.raises(UserError, match="n_classes = 3 but data file .* has 2 labels"):
        finetune(config(data, n_classes=3), tmp_path / "three", init=run)
    with pytest.raises(UserError, match="--init .*nowhere: not found"):
        finetune(config(data), tmp_path / "nowhere-run", init=tmp_path / "nowhere")
    missing = app("finetune", "--data", data, "--out", tmp_path / "out")
    assert_user_error(missing, "--init is missing")
    # a checkpoint directory of the run (not its params.h5) of another width: the same line
    checkpoint = list_checkpoints(run)[0]
    wider = app("finetune", "--config", "tiny", "--block-size", 16, "--data", data, "--init",
                checkpoint, "--out", tmp_path / "out", "--n-embd", 64)
    assert_user_error(wider, str(checkpoint), "n_embd = 32", "n_embd = 64",
                      "expected the same n_embd")
    assert not (tmp_path / "out").exists()


def ranked_finetune(inputs, out, *extra):
    """`app finetune` under `mpiexec -n 4` in DP=2 x PP=2 (float64, no periodic saves)."""
    run, data = inputs
    return command(4, "finetune", "--config", "tiny", "--n-layer", 2, "--n-head", 2,
                   "--n-embd", 32, "--block-size", 16, "--batch-size", 16, "--lr", 3e-3,
                   "--min-lr", 3e-4, "--warmup-steps", 5, "--eval-interval", 50,
                   "--log-interval", 1, "--pool", "mean", "--seed", 1, "--dtype", "float64",
                   "--steps", 200, "--save-interval", 0, "--pp", 2, "--micro-batches", 2,
                   "--data", data, "--init", run, "--out", out, *extra)


def finetune_results(run):
    """Losses by step from metrics.jsonl, the final parameters and best.h5's step."""
    losses = {record["step"]: record["loss"]
              for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in record}
    params, _ = load_params(run / "params.h5")
    with h5py.File(run / BEST, "r") as f:
        return losses, params, int(f.attrs["step"])


def test_sigterm_to_one_rank_checkpoints_every_rank_and_the_resume_is_bit_exact(inputs,
                                                                               tmp_path):
    """As `app train` (tests/test_resume.py): SIGTERM reaches one rank of four mid-run; all
    agree on a step, save, and exit 75 ("requeue me"); `--resume auto` then finishes the run
    bit for bit as an uninterrupted one."""
    import signal
    import subprocess
    from app.preempt import REQUEUE_EXIT_CODE
    from tests.test_checkpoint_faults import rank_pids

    def finish(out, *extra):
        result = subprocess.run(ranked_finetune(inputs, out, *extra), cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    finish(tmp_path / "whole")
    run = tmp_path / "run"
    job = subprocess.Popen(ranked_finetune(inputs, run), cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stdout:
            if line.startswith("step    20/"):
                break
        os.kill(rank_pids(str(run))[2], signal.SIGTERM)  # one rank of the four
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == REQUEUE_EXIT_CODE, err
    assert "stopped by SIGTERM: checkpoint of step" in out, out
    assert not (run / "params.h5").exists() and list_checkpoints(run)
    finish(run, "--resume", "auto")
    losses, params, best_step = finetune_results(run)
    ref_losses, ref_params, ref_best_step = finetune_results(tmp_path / "whole")
    assert losses == ref_losses and best_step == ref_best_step
    for name, value in ref_params.items():
        assert np.array_equal(params[name], value), name


# --------------------------------------------------------------------------- mpiexec -n 4

STEPS, RTOL = 5, 1e-5
LAYOUTS = {"dp4-zero1": dict(zero=1, bucket_mb=0.002), "dp2-pp2": dict(pp=2, micro_batches=2)}


@pytest.mark.mpi(min_size=4)
def test_layouts_match_one_process():
    """Each layout's losses, validation scores and parameters after STEPS steps equal one
    process's (rank 0 runs it alone, then shares it)."""
    from mpi4py import MPI
    skip_unless_ranks(4, "fine-tuning on dp4 and dp2 x pp2")
    world, verdict = MPI.COMM_WORLD, Verdict()
    group = groups_of(world, 4)
    with shared_tmpdir(world) as root:
        inputs, reference = None, None
        if world.Get_rank() == 0:
            with verdict.guard("reference"):
                inputs = make_inputs(root, MPI.COMM_SELF)
                cfg = config(inputs[1], steps=STEPS, eval_interval=STEPS, dtype="float64")
                history = finetune(cfg, root / "one", init=inputs[0], log=lambda *a: None,
                                   comm=MPI.COMM_SELF)
                reference = history["loss"], history["val"][STEPS], history["params"].flat
        inputs, reference = world.bcast((inputs, reference), root=0)
        for name, layout in LAYOUTS.items():
            if group is None or reference is None:
                continue
            with verdict.guard(name):
                cfg = config(inputs[1], steps=STEPS, eval_interval=STEPS, dtype="float64",
                             timeout=60, **layout)
                history = finetune(cfg, root / name, init=inputs[0], log=lambda *a: None,
                                   comm=group)
                verdict.close(f"{name} losses", history["loss"], reference[0], RTOL)
                verdict.close(f"{name} val accuracy", history["val"][STEPS]["accuracy"],
                              reference[1]["accuracy"], RTOL)
                verdict.close(f"{name} parameters", history["params"].flat, reference[2],
                              RTOL, atol=1e-12)
        if group is not None:
            group.Free()
        verdict.check(world)
