"""app/generate.py: the sampler (greedy, top-k, cropping, streaming), the command's argument
errors and the runs it refuses."""
import argparse

import h5py
import numpy as np
import pytest

from app import generate
from app.checkpoint import load_params, save_params
from app.config import make_config
from app.errors import UserError
from app.generate import load_run, sample
from app.tokenizer import get_tokenizer
from app_util import write_run
from models import gpt

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=256)


@pytest.fixture(scope="module")
def params():
    """GPT-2 init plus noise, so that next-token distributions are far from uniform and
    greedy decoding does not just repeat one token."""
    p = gpt.init_params(CFG, seed=0, dtype=np.float64)
    p.flat += np.random.default_rng(1).normal(0.0, 0.3, p.size)
    return p


def greedy_by_hand(params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        context = np.array([ids[-CFG.block_size:]], dtype=np.int64)
        ids.append(int(np.argmax(gpt.logits(params, CFG, context)[0])))
    return ids[len(prompt):]


PROMPT = [104, 105, 32]  # "hi "


def test_greedy_is_argmax_step_by_step(params):
    out = sample(params, CFG, PROMPT, 12, temperature=0)
    assert out == greedy_by_hand(params, PROMPT, 12)
    assert len(set(out)) > 1  # a non-trivial sequence, so the comparison means something


def test_greedy_is_deterministic_and_ignores_seed(params):
    a = sample(params, CFG, PROMPT, 10, temperature=0, seed=0)
    b = sample(params, CFG, PROMPT, 10, temperature=0, seed=123)
    assert a == b


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_is_greedy(params, temperature):
    greedy = sample(params, CFG, PROMPT, 10, temperature=0)
    assert sample(params, CFG, PROMPT, 10, temperature=temperature, top_k=1, seed=7) == greedy


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_output_length(params, n):
    out = sample(params, CFG, PROMPT, n, temperature=1.0, seed=0)
    assert len(out) == n
    assert all(isinstance(t, int) and 0 <= t < CFG.vocab_size for t in out)


def test_long_context_is_cropped(params):
    prompt = list(np.random.default_rng(2).integers(0, 256, size=3 * CFG.block_size + 1))
    out = sample(params, CFG, prompt, 6, temperature=0)
    assert len(out) == 6
    assert out == greedy_by_hand(params, prompt, 6)
    # only the last block_size tokens matter
    assert out == sample(params, CFG, prompt[-CFG.block_size:], 6, temperature=0)


def test_prompt_as_token_array(params):
    prompt = get_tokenizer("bytes").encode("hi ")  # np.uint8, as generate's run passes it
    assert prompt.dtype == np.uint8
    assert sample(params, CFG, prompt, 8, temperature=0) == sample(params, CFG, PROMPT, 8,
                                                                   temperature=0)


def test_sampling_is_seeded(params):
    a = sample(params, CFG, PROMPT, 30, temperature=1.5, seed=4)
    assert a == sample(params, CFG, PROMPT, 30, temperature=1.5, seed=4)
    assert a != sample(params, CFG, PROMPT, 30, temperature=1.5, seed=5)


def test_top_k_only_draws_from_the_k_likeliest(params):
    k = 3
    out = sample(params, CFG, PROMPT, 25, temperature=2.0, top_k=k, seed=0)
    ids = list(PROMPT)
    for token in out:
        logits = gpt.logits(params, CFG, np.array([ids[-CFG.block_size:]]))[0]
        assert token in set(np.argsort(logits)[-k:].tolist())
        ids.append(token)
    assert len(set(out)) > 1


# --------------------------------------------------------------------------- the command


@pytest.fixture
def run_dir(tmp_path, params):
    """A run directory as `app train` leaves it, for the model above."""
    return write_run(tmp_path / "run", params, CFG, dtype="float64")


def cli(argv):
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args([str(a) for a in argv]))


def test_run_prints_prompt_and_greedy_continuation(run_dir, params, capsys):
    assert cli(["--run", run_dir, "--prompt", "hi ", "--max-new-tokens", 7,
                "--temperature", 0]) == 0
    expected = "hi " + get_tokenizer("bytes").decode(greedy_by_hand(params, PROMPT, 7)) + "\n"
    assert capsys.readouterr().out == expected


def test_load_run(run_dir, params):
    cfg, loaded, attrs = load_run(run_dir)
    assert cfg.model_config() == CFG
    assert attrs["tokenizer"] == "bytes"
    for name in gpt.param_shapes(CFG):
        np.testing.assert_array_equal(loaded[name], params[name])


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: expected an integer >= 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: expected a number >= 0"),
    (["--top-k", "-3"], "--top-k -3: expected an integer >= 0"),
    (["--prompt", ""], "--prompt is empty: expected at least one character"),
])
def test_argument_errors(run_dir, flags, message, capsys):
    with pytest.raises(UserError) as err:
        cli(["--run", run_dir, *flags])
    assert str(err.value) == message
    assert capsys.readouterr().out == ""


def test_missing_run_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as err:
        cli(["--run", missing])
    assert str(err.value) == (f"run directory {missing}: missing config.toml "
                              "(expected a directory written by `app train`)")


def test_run_dir_without_params(run_dir):
    (run_dir / "params.h5").unlink()
    with pytest.raises(UserError, match="missing params.h5"):
        cli(["--run", run_dir])


def test_run_dir_with_corrupt_params(run_dir):
    (run_dir / "params.h5").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot open as HDF5"):
        cli(["--run", run_dir])


def test_run_dir_with_invalid_config_toml(run_dir):
    (run_dir / "config.toml").write_text("n_layer = \n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        cli(["--run", run_dir])
    assert str(run_dir) in str(err.value) and "config.toml is not valid TOML" in str(err.value)


def test_run_dir_with_invalid_config_value(run_dir):
    (run_dir / "config.toml").write_text("n_layer = 0\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"config n_layer = 0: expected an integer > 0"):
        cli(["--run", run_dir])


def test_run_dir_config_disagrees_with_params(run_dir):
    cfg = make_config({"n_layer": 3, "n_head": CFG.n_head, "n_embd": CFG.n_embd,
                       "block_size": CFG.block_size})
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    with pytest.raises(UserError) as err:
        cli(["--run", run_dir, "--prompt", "ab"])
    assert "params.h5 does not match config.toml" in str(err.value)
    assert "'h.2." in str(err.value)


def test_run_dir_config_disagrees_with_param_shapes(run_dir):
    cfg = make_config({"n_layer": CFG.n_layer, "n_head": CFG.n_head, "n_embd": 2 * CFG.n_embd,
                       "block_size": CFG.block_size})
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    with pytest.raises(UserError) as err:
        cli(["--run", run_dir])
    assert "params.h5 does not match config.toml (first mismatch: 'wte')" in str(err.value)


# --------------------------------------------------------------------------- streaming


def test_run_streams_what_sample_returns(run_dir, params, capsys):
    """Temperature 2 draws bytes that are not valid UTF-8 on their own: the streamed text
    is still exactly the decoding of all new ids at once."""
    assert cli(["--run", run_dir, "--prompt", "hi ", "--max-new-tokens", 40,
                "--temperature", 2, "--seed", 3]) == 0
    new = sample(params, CFG, PROMPT, 40, temperature=2, seed=3)
    assert max(new) >= 128  # the test means something
    assert capsys.readouterr().out == "hi " + get_tokenizer("bytes").decode(new) + "\n"


def test_run_prints_each_piece_as_soon_as_its_token_is_drawn(run_dir, monkeypatch, capsys):
    seen = []  # stdout written since the previous token was asked for

    def fake_stream(*args):
        for token in get_tokenizer("bytes").encode("é🙂x"):
            seen.append(capsys.readouterr().out)
            yield int(token)
        seen.append(capsys.readouterr().out)

    monkeypatch.setattr(generate, "sample_stream", fake_stream)
    assert cli(["--run", run_dir, "--prompt", "hi "]) == 0
    seen.append(capsys.readouterr().out)
    # A character's text appears with its last byte: 2 bytes for é, 4 for 🙂.
    assert seen == ["hi ", "", "é", "", "", "", "🙂", "x", "\n"]


def test_sample_stream_yields_what_sample_returns(params):
    stream = generate.sample_stream(params, CFG, PROMPT, 10, temperature=1.0, seed=2)
    assert next(stream) == sample(params, CFG, PROMPT, 1, temperature=1.0, seed=2)[0]
    assert [next(stream)] + list(stream) == sample(params, CFG, PROMPT, 10, temperature=1.0,
                                                   seed=2)[1:]


# --------------------------------------------------------------------------- bad runs


def rewrite_params(run_dir, change):
    """Load the run's params.h5, let `change(params)` edit them, and save it back."""
    params, attrs = load_params(run_dir / "params.h5")
    change(params, attrs)
    save_params(run_dir / "params.h5", params, attrs)


def test_non_finite_parameters_name_the_first_tensor_in_model_order(run_dir):
    def poison(params, attrs):
        params["wte"][3, :2] = [np.inf, -np.inf]  # first in the model, last by name
        params["h.0.attn.c_attn.weight"][0, 0] = np.nan

    rewrite_params(run_dir, poison)
    with pytest.raises(UserError) as err:
        cli(["--run", run_dir])
    assert str(err.value) == (f"run directory {run_dir}: params.h5 holds non-finite values in "
                              f"'wte' (2 of {256 * 16} are NaN or inf): the run diverged or "
                              "the file is damaged; expected finite parameters")


def test_damaged_parameter_bytes_are_refused(run_dir):
    with h5py.File(run_dir / "params.h5", "r") as f:
        offset = f["h.1.mlp.c_fc.weight"].id.get_offset()
    with open(run_dir / "params.h5", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)  # all-ones float64s are NaNs
    with pytest.raises(UserError, match=r"non-finite values in 'h\.1\.mlp\.c_fc\.weight' "
                                        r"\(8 of 1024"):
        load_run(run_dir)


def test_config_vocab_size_unlike_the_tokenizers(run_dir):
    config = (run_dir / "config.toml").read_text(encoding="utf-8")
    (run_dir / "config.toml").write_text(config.replace("vocab_size = 256", "vocab_size = 1000"),
                                         encoding="utf-8")
    with pytest.raises(UserError) as err:
        cli(["--run", run_dir])
    assert str(err.value) == (f"run directory {run_dir}: config.toml has vocab_size = 1000 but "
                              "the run's tokenizer 'bytes' has 256: expected them to match")


def test_unknown_tokenizer_in_params(run_dir):
    rewrite_params(run_dir, lambda params, attrs: attrs.update(tokenizer="gpt5"))
    with pytest.raises(UserError, match=r"params\.h5: unknown tokenizer 'gpt5'"):
        cli(["--run", run_dir])
