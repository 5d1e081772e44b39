"""app/evaluate.py: the printed validation loss is the mean next-token cross-entropy over the
trainer's validation windows, computed here another way, and the trainer's own figure."""
import argparse
import json
import math
import re

import numpy as np
import pytest

from app import evaluate
from app.data import TokenData, validation_starts
from app.errors import UserError
from app_util import app, assert_user_error, FAST, write_run
from models import gpt
from test_export import CFG, noisy_params

LINE = re.compile(r"val loss (\S+) \| perplexity (\S+) \| (\d+) windows of (\d+) tokens "
                  r"\(([\d,]+) tokens\) from (.+)\n")


@pytest.fixture(scope="module")
def params():
    return noisy_params()


def cli(*argv):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run(parser.parse_args([str(a) for a in argv]))


def printed(capsys):
    """(loss, perplexity, windows, tokens, data path) of the command's one line."""
    out = capsys.readouterr().out
    match = LINE.fullmatch(out)
    assert match, out
    loss, ppl, windows, block, tokens, path = match.groups()
    assert int(block) == CFG.block_size
    return float(loss), float(ppl), int(windows), int(tokens.replace(",", "")), path


def direct_loss(params, data_path, n_windows):
    """Mean of -log softmax(logits)[next token] over every position of the validation
    windows, from float64 logits one position at a time (no batching, no forward())."""
    p64 = {name: np.asarray(value, np.float64) for name, value in params.items()}
    with TokenData(data_path) as data:
        val = data.val[:].astype(np.int64)
    starts = validation_starts(len(val), CFG.block_size, n_windows)
    windows = np.stack([val[s:s + CFG.block_size + 1] for s in starts])
    losses = []
    for t in range(CFG.block_size):
        logits = gpt.logits(p64, CFG, windows[:, :t + 1])  # (windows, V): after token t
        log_probs = logits - logits.max(1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
        losses.append(-log_probs[np.arange(len(windows)), windows[:, t + 1]])
    return float(np.mean(losses)), len(windows)


def test_printed_loss_equals_a_direct_computation(tmp_path, tiny_h5, params, capsys):
    # 20 windows in batches of 6: the last batch is smaller and must weigh less
    run = write_run(tmp_path / "run", params, CFG, data=str(tiny_h5), eval_windows=20, batch_size=6)
    assert cli("--run", run) == 0
    loss, ppl, windows, tokens, path = printed(capsys)
    expected, n = direct_loss(params, tiny_h5, 20)
    assert (windows, tokens, path) == (n, n * CFG.block_size, str(tiny_h5)) == \
        (20, 160, str(tiny_h5))
    assert loss == pytest.approx(expected, abs=2e-6)  # printed to 6 decimals
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)
    assert loss > 3.0  # far from a trained model's: the comparison means something


def test_data_and_windows_flags_win_over_the_config(tmp_path, tiny_h5, params, capsys):
    run = write_run(tmp_path / "run", params, CFG, data=str(tmp_path / "gone.h5"))
    assert cli("--run", run, "--data", tiny_h5, "--windows", 5) == 0
    loss, _, windows, _, path = printed(capsys)
    assert (windows, path) == (5, str(tiny_h5))
    assert loss == pytest.approx(direct_loss(params, tiny_h5, 5)[0], abs=2e-6)
    # more windows than the split holds without overlap: as many as it holds
    assert cli("--run", run, "--data", tiny_h5, "--windows", 10**6) == 0
    with TokenData(tiny_h5) as data:
        assert printed(capsys)[2] == len(data.val) // (CFG.block_size + 1)


def test_eval_reproduces_the_trainers_last_validation(tmp_path, tiny_h5):
    run = tmp_path / "run"
    trained = app("train", *FAST, "--data", tiny_h5, "--eval-windows", 7, "--out", run)
    assert trained.returncode == 0, trained.stderr
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        last_val = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r][-1]
    result = app("eval", "--run", run)  # the run's data file and 7 windows
    assert result.returncode == 0 and result.stderr == "", result.stderr
    match = LINE.fullmatch(result.stdout)
    assert match and match.group(3) == "7", result.stdout
    assert float(match.group(1)) == pytest.approx(last_val, abs=6e-7)


def test_bad_windows_is_one_line(tmp_path, tiny_h5, params):
    run = write_run(tmp_path / "run", params, CFG, data=str(tiny_h5))
    assert_user_error(app("eval", "--run", run, "--windows", 0),
                      "error: --windows 0: expected an integer > 0")


def test_missing_data_file_is_named(tmp_path, params):
    missing = tmp_path / "gone.h5"
    run = write_run(tmp_path / "run", params, CFG, data=str(missing))
    with pytest.raises(UserError, match=re.escape(f"data file {str(missing)!r} not found")):
        cli("--run", run)


def test_missing_run_dir(tmp_path):
    assert_user_error(app("eval", "--run", tmp_path / "nope"),
                      f"run directory {tmp_path / 'nope'}: missing config.toml")
