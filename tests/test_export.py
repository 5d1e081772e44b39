"""app/export.py: a run as a Hugging Face GPT-2 directory; every tensor read back, the logits
of transformers' GPT2LMHeadModel (when torch and transformers are importable) and the
outputs and run directories the command refuses."""
import argparse
import importlib.util
import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from app import export
from app.errors import UserError
from app_util import app, assert_user_error, write_run
from models import gpt

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=256)


def noisy_params(dtype=np.float32, seed=1):
    """GPT-2 init plus noise: no tensor is all zeros or ones, so a swapped or transposed
    tensor cannot go unnoticed, and logits are far from uniform."""
    p = gpt.init_params(CFG, seed=0, dtype=dtype)
    p.flat += np.random.default_rng(seed).normal(0.0, 0.3, p.size).astype(dtype)
    return p


@pytest.fixture(scope="module")
def params():
    return noisy_params()


@pytest.fixture
def run_dir(tmp_path, params):
    return write_run(tmp_path / "run", params, CFG)


def cli(*argv):
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export.run(parser.parse_args([str(a) for a in argv]))


def hf_name(name):
    return f"transformer.{name}" + (".weight" if name in ("wte", "wpe") else "")


# --------------------------------------------------------------------------- the tensors


def test_every_tensor_is_written_under_its_hf_name(run_dir, params, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli("--run", run_dir, "--format", "hf-gpt2", "--out", out) == 0
    assert capsys.readouterr().out == (
        f"exported {run_dir} (2 layers, 16 wide, context 8, vocab 256) as hf-gpt2 to {out}: "
        "config.json, model.safetensors\n")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".hf*"))  # the temporary directory is gone
    tensors = load_file(out / "model.safetensors")
    shapes = gpt.param_shapes(CFG)
    assert set(tensors) == {hf_name(name) for name in shapes}  # no lm_head: tied to wte
    for name, shape in shapes.items():
        got = tensors[hf_name(name)]
        assert got.shape == shape and got.dtype == np.float32, name
        np.testing.assert_array_equal(got, params[name], err_msg=name)
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers checks for


def test_config_json_describes_our_model(run_dir, tmp_path):
    cli("--run", run_dir, "--out", tmp_path / "hf")  # hf-gpt2 is the default format
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert {key: config[key] for key in ("model_type", "vocab_size", "n_positions", "n_embd",
                                         "n_layer", "n_head", "n_inner")} == {
        "model_type": "gpt2", "vocab_size": 256, "n_positions": 8, "n_embd": 16, "n_layer": 2,
        "n_head": 2, "n_inner": 64}
    assert config["activation_function"] == "gelu_new"
    assert config["layer_norm_epsilon"] == 1e-5
    assert config["tie_word_embeddings"] is True
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0


def test_export_from_a_params_dict(params, tmp_path):
    """The function a checkpoint loader will call: no run directory involved."""
    export.export_hf_gpt2(dict(params.items()), CFG, tmp_path / "a" / "b")
    tensors = load_file(tmp_path / "a" / "b" / "model.safetensors")
    np.testing.assert_array_equal(tensors["transformer.h.1.mlp.c_fc.weight"],
                                  params["h.1.mlp.c_fc.weight"])


def test_float64_run_is_rounded_to_float32(tmp_path):
    params64 = noisy_params(np.float64)
    run = write_run(tmp_path / "run", params64, CFG, dtype="float64")
    cli("--run", run, "--out", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for name in gpt.param_shapes(CFG):
        assert tensors[hf_name(name)].dtype == np.float32
        np.testing.assert_array_equal(tensors[hf_name(name)], params64[name].astype(np.float32))


def test_help_states_the_limits():
    result = app("export", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for fragment in ("not GPT-2's BPE", "vocab_size 256", "UTF-8 bytes",
                     "n_positions = the run's block_size", "GPT2LMHeadModel.from_pretrained"):
        assert fragment in text, fragment


# --------------------------------------------------------------------------- transformers


def test_transformers_gives_our_logits(run_dir, params, tmp_path):
    """GPT2LMHeadModel.from_pretrained on the export computes our logits at every position."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not importable (an optional dependency: see "
                    "the README's Export section)")
    import torch
    from transformers import GPT2LMHeadModel

    cli("--run", run_dir, "--out", tmp_path / "hf")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # tied
    idx = np.random.default_rng(3).integers(0, CFG.vocab_size, size=(3, CFG.block_size))
    with torch.no_grad():
        theirs = model(torch.from_numpy(idx)).logits.numpy()  # (B,T,V)
    # ours gives the logits after the last token: one prefix per position
    ours = np.stack([gpt.logits(params, CFG, idx[:, :t + 1]) for t in range(CFG.block_size)],
                    axis=1)
    assert theirs.dtype == ours.dtype == np.float32
    scale = np.abs(ours).max()
    diff = np.abs(theirs - ours)
    clear = np.abs(ours) > 0.01 * scale  # a logit near 0 has no meaningful relative error
    print(f"logits: max |ours| {scale:.3f}, max abs diff {diff.max():.3e} "
          f"({diff.max() / scale:.1e} of max |ours|), max rel diff "
          f"{(diff[clear] / np.abs(ours[clear])).max():.3e} where |ours| > 1% of max")
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * scale)


# --------------------------------------------------------------------------- refusals


def test_missing_run_dir_is_one_line(tmp_path):
    missing = tmp_path / "nope"
    result = app("export", "--run", missing, "--out", tmp_path / "hf")
    assert_user_error(result, f"run directory {missing}: missing config.toml")
    assert not (tmp_path / "hf").exists()


def test_unknown_format_is_one_line(run_dir, tmp_path):
    result = app("export", "--run", run_dir, "--format", "onnx", "--out", tmp_path / "hf")
    assert_user_error(result, "error: --format onnx: expected one of hf-gpt2")
    assert not (tmp_path / "hf").exists()


def test_existing_export_is_refused_without_overwrite(run_dir, tmp_path):
    out = tmp_path / "hf"
    cli("--run", run_dir, "--out", out)
    before = (out / "model.safetensors").read_bytes()
    result = app("export", "--run", run_dir, "--out", out)
    assert_user_error(result, f"--out {out} is not empty (holds config.json, model.safetensors)",
                      "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before


def test_overwrite_replaces_a_previous_export(run_dir, params, tmp_path):
    out = tmp_path / "hf"
    export.export_hf_gpt2(dict(noisy_params(seed=5).items()), CFG, out)
    cli("--run", run_dir, "--out", out, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # nothing left aside
    tensors = load_file(out / "model.safetensors")
    np.testing.assert_array_equal(tensors["transformer.wte.weight"], params["wte"])


def test_empty_directory_is_used(run_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    assert cli("--run", run_dir, "--out", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_that_is_no_export_is_never_replaced(run_dir, tmp_path, overwrite):
    with pytest.raises(UserError) as err:
        cli("--run", run_dir, "--out", run_dir, *overwrite)
    assert str(run_dir) in str(err.value) and "config.toml" in str(err.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "params.h5"]


def test_out_is_a_file(run_dir, tmp_path):
    (tmp_path / "hf").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="is a file: expected a directory to create"):
        cli("--run", run_dir, "--out", tmp_path / "hf", "--overwrite")


def test_failed_write_keeps_the_old_export_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    cli("--run", run_dir, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", disk_full)
    with pytest.raises(UserError) as err:
        cli("--run", run_dir, "--out", out, "--overwrite")
    assert str(err.value) == (f"--out {out}: cannot write the export ([Errno 28] No space left "
                              "on device): expected a writable location")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
