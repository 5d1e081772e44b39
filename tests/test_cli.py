"""`python -m app ...` as a user runs it: bad input is one `error:` line, exit 2, no traceback."""
import importlib.util

import h5py
import numpy as np
import pytest

from app.config import field_names
from app.generate import load_run, sample
from app.prepare import prepare
from app.tokenizer import get_tokenizer
from app_util import app, assert_user_error, FAST, mpiexec_app
from conftest import corpus_text


@pytest.fixture(scope="module")
def data_h5(tmp_path_factory):
    """A prepared byte-token file: ~18 KB train, ~2 KB val."""
    d = tmp_path_factory.mktemp("cli_data")
    (d / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    prepare([d / "corpus.txt"], d / "data.h5", val_fraction=0.1)
    return d / "data.h5"


@pytest.fixture(scope="module")
def short_h5(tmp_path_factory):
    """A prepared file of 100 tokens: 60 train, 40 val."""
    d = tmp_path_factory.mktemp("cli_short")
    (d / "short.txt").write_text("abcdefghij" * 10, encoding="utf-8")
    summary = prepare([d / "short.txt"], d / "short.h5", val_fraction=0.4)
    assert (summary["train_tokens"], summary["val_tokens"]) == (60, 40)
    return d / "short.h5"


# --------------------------------------------------------------------------- prepare


def test_prepare_missing_input(tmp_path):
    missing = tmp_path / "nope.txt"
    result = app("prepare", "--input", missing, "--out", tmp_path / "x.h5")
    assert_user_error(result, repr(str(missing)), "not found", "expected a text file")
    assert not (tmp_path / "x.h5").exists()


def test_prepare_directory_without_text(tmp_path):
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "notes.md").write_text("not a .txt file", encoding="utf-8")
    result = app("prepare", "--input", empty, "--out", tmp_path / "x.h5")
    assert_user_error(result, repr(str(empty)), "no *.txt files")
    assert not (tmp_path / "x.h5").exists()


def test_prepare_empty_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    result = app("prepare", "--input", tmp_path / "empty.txt", "--out", tmp_path / "x.h5")
    assert_user_error(result, "empty.txt", "is empty")


# --------------------------------------------------------------------------- train: data


@pytest.mark.parametrize("block_size, split, n_tokens", [(50, "val", 40), (80, "train", 60)])
def test_train_corpus_shorter_than_block(short_h5, tmp_path, block_size, split, n_tokens):
    out = tmp_path / "run"
    result = app("train", *FAST, "--data", short_h5, "--block-size", block_size, "--out", out)
    assert_user_error(result, f"the {split} split", f"has {n_tokens} tokens",
                      f"block_size {block_size} needs at least {block_size + 1}")
    assert not out.exists()


def test_train_h5_not_made_by_prepare(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.random.default_rng(0).random(100)
    result = app("train", *FAST, "--data", foreign, "--out", tmp_path / "run")
    assert_user_error(result, repr(str(foreign)), "format attribute None", "'gpt-tokens'")


def test_train_h5_without_val(data_h5, tmp_path):
    noval = tmp_path / "noval.h5"
    noval.write_bytes(data_h5.read_bytes())
    with h5py.File(noval, "a") as f:
        del f["val"]
    result = app("train", *FAST, "--data", noval, "--out", tmp_path / "run")
    assert_user_error(result, repr(str(noval)), "no 1-D dataset 'val'")


def test_train_data_not_hdf5(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("plain text, not a token file", encoding="utf-8")
    result = app("train", *FAST, "--data", text, "--out", tmp_path / "run")
    assert_user_error(result, repr(str(text)), "is not an HDF5 file")


def test_train_data_missing(tmp_path):
    missing = tmp_path / "missing.h5"
    result = app("train", *FAST, "--data", missing, "--out", tmp_path / "run")
    assert_user_error(result, repr(str(missing)), "not found")


def test_train_vocab_mismatch(data_h5, tmp_path):
    out = tmp_path / "run"
    result = app("train", *FAST, "--data", data_h5, "--vocab-size", 300, "--out", out)
    assert_user_error(result, "vocab_size 256", "vocab_size = 300", str(data_h5))
    assert not out.exists()


# --------------------------------------------------------------------------- train: config

BAD_FLAGS = [
    (["--n-embd", "30", "--n-head", "4"], ["n_embd = 30", "n_head = 4", "n_embd % n_head"]),
    (["--lr", "0"], ["lr = 0.0", "expected a number > 0"]),
    (["--lr", "-1"], ["lr = -1.0", "expected a number > 0"]),
    (["--batch-size", "0"], ["batch_size = 0", "expected an integer > 0"]),
    (["--steps", "0"], ["steps = 0", "expected an integer > 0"]),
    (["--steps", "-5"], ["steps = -5", "expected an integer > 0"]),
    (["--seed", "-1"], ["seed = -1", "expected an integer >= 0"]),
    (["--min-lr", "0.5"], ["min_lr = 0.5", "expected a number in [0, lr = 0.003]"]),
    (["--dtype", "float16"], ["dtype = 'float16'", "one of float32, float64"]),
    (["--peak-gflops", "0"], ["--peak-gflops 0.0", "expected a number > 0"]),
]


@pytest.mark.parametrize("flags, fragments", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_train_bad_flags(data_h5, tmp_path, flags, fragments):
    out = tmp_path / "run"
    result = app("train", *FAST, "--data", data_h5, "--out", out, *flags)
    assert_user_error(result, *fragments)
    assert not out.exists()  # nothing written on bad input


def test_train_unknown_key_in_config_file(data_h5, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("n_layer = 1\nlearnin_rate = 0.01\n", encoding="utf-8")
    result = app("train", "--config", path, "--data", data_h5, "--peak-gflops", 100,
                 "--out", tmp_path / "run")
    line = assert_user_error(result, "'learnin_rate'", str(path), "valid keys: ")
    for key in field_names():
        assert key in line.split("valid keys: ")[1]


def test_train_unknown_config_name(tmp_path):
    result = app("train", "--config", "huge", "--out", tmp_path / "run")
    assert_user_error(result, "'huge' not found", "baby, small, tiny")


def test_train_gpu_without_cupy(data_h5, tmp_path):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is importable here")
    out = tmp_path / "run"
    result = app("train", *FAST, "--data", data_h5, "--device", "gpu", "--out", out)
    assert_user_error(result, "device 'gpu'", "cupy", "device 'cpu'")
    assert not out.exists()


# --------------------------------------------------------------------------- generate


def test_generate_missing_run_dir(tmp_path):
    missing = tmp_path / "no_run"
    result = app("generate", "--run", missing, "--prompt", "ab")
    assert_user_error(result, str(missing), "missing config.toml")


def test_generate_negative_max_new_tokens(tmp_path):
    result = app("generate", "--run", tmp_path, "--max-new-tokens", "-3")
    assert_user_error(result, "--max-new-tokens -3", "expected an integer >= 0")


# --------------------------------------------------------------------------- happy path


def test_prepare_train_generate_end_to_end(tmp_path):
    (tmp_path / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    data = tmp_path / "data" / "corpus.h5"
    result = app("prepare", "--input", tmp_path / "corpus.txt", "--out", data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"prepared {data}: ")
    assert data.is_file()

    run = tmp_path / "run"
    result = app("train", "--config", "tiny", "--data", data, "--steps", 20, "--sample-tokens", 0,
                 "--eval-windows", 2, "--peak-gflops", 100, "--log-interval", 5, "--out", run)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("config: ")
    assert "step    19/20 | loss " in result.stdout
    assert "step    20/20 | val loss " in result.stdout
    assert result.stdout.endswith(f"done: 20 steps; run directory {run} holds config.toml, "
                                  "metrics.jsonl, params.h5\n")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.toml", "metrics.jsonl",
                                                     "params.h5"]

    result = app("generate", "--run", run, "--prompt", "ab", "--max-new-tokens", 5,
                 "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("ab")
    cfg, params, _ = load_run(run)  # the same 5 greedy tokens, computed here
    new = sample(params, cfg.model_config(), get_tokenizer("bytes").encode("ab"), 5, 0.0)
    assert len(new) == 5
    assert result.stdout == "ab" + get_tokenizer("bytes").decode(new) + "\n"
    again = app("generate", "--run", run, "--prompt", "ab", "--max-new-tokens", 5,
                "--temperature", 0, "--seed", 9)
    assert again.stdout == result.stdout  # greedy: same text, whatever the seed


def test_bad_input_under_mpiexec_exits_on_every_rank(tiny_h5):
    """Each rank validates the same config and exits; rank 0 alone prints the error, so no
    rank is left waiting for a peer that already quit and the user reads one line."""
    result = mpiexec_app(2, "train", *FAST, "--data", tiny_h5, "--lr", "-1")
    assert_user_error(result, "error: config lr = -1.0: expected a number > 0")


@pytest.mark.parametrize("flags, message", [
    (["--dp", "3"], "error: world size 2 != dp*pp*tp = 3*1*1 = 3: expected the ranks to fill "
                    "the grid exactly"),
    (["--batch-size", "6", "--micro-batches", "2"],
     "error: config batch_size = 6 is not divisible by dp * micro_batches = 2 * 2: expected a "
     "multiple of 4"),
    (["--bucket-mb", "0"], "error: config bucket_mb = 0.0: expected a bucket size in MB > 0"),
])
def test_bad_layout_exits_on_every_rank(tiny_h5, flags, message):
    result = mpiexec_app(2, "train", *FAST, "--data", tiny_h5, *flags)
    assert_user_error(result, message)


@pytest.mark.parametrize("flags, message", [
    (["--n-layer", "2", "--pp", "3"], "error: config pp * chunks = 3 * 1 exceeds n_layer = 2: "
                                      "expected at least one block per (virtual) stage"),
    (["--pp", "2", "--batch-size", "6", "--micro-batches", "4"],
     "error: config batch_size = 6 is not divisible by dp * micro_batches = 1 * 4: expected "
     "a multiple of 4"),
    (["--pp", "2", "--chunks", "2"], 'error: config chunks = 2 needs schedule = "interleaved", '
                                     "not '1f1b': expected chunks = 1 for gpipe and 1f1b"),
    (["--n-layer", "6", "--pp", "2", "--schedule", "interleaved", "--chunks", "2",
      "--micro-batches", "2"], "error: config n_layer = 6 is not divisible by pp * chunks = "
                               "2 * 2: interleaving needs equal chunks"),
])
def test_bad_pipeline_layout_exits_on_every_rank(tiny_h5, flags, message):
    result = mpiexec_app(2, "train", *FAST, "--data", tiny_h5, *flags)
    assert_user_error(result, message)


# --------------------------------------------------------------------------- help and flags


def test_train_help_shows_the_values_of_the_chosen_config():
    small = app("train", "--config", "small", "--help")
    assert small.returncode == 0, small.stderr
    assert "transformer blocks (small: 6)" in " ".join(small.stdout.split())
    # --help first, --config after: the same, since help waits for every flag
    late = app("train", "--help", "--config", "small")
    assert late.stdout == small.stdout
    default = app("train", "--help")
    assert "transformer blocks (baby: 4)" in " ".join(default.stdout.split())


def test_flags_are_never_abbreviated(data_h5, tmp_path):
    result = app("train", *FAST, "--data", data_h5, "--out", tmp_path / "run", "--step", "3")
    assert result.returncode == 2
    assert "unrecognized arguments: --step 3" in result.stderr
    assert not (tmp_path / "run").exists()
