"""app/config.py: shipped configs, overrides, types, TOML round trip, validation rules."""
import argparse
import dataclasses
import math
import re
import tomllib

import pytest

from app import config
from app.config import (TrainConfig, add_config_arguments, field_names, load_config, make_config,
                        validate)
from app.errors import UserError


def shape(cfg):
    return (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size)


# --------------------------------------------------------------------------- shipped configs


def test_baby_has_the_issue_shape():
    cfg = load_config("baby")
    assert shape(cfg) == (4, 4, 128, 64, 12)
    assert cfg.vocab_size == 256


def test_small_has_the_issue_shape():
    cfg = load_config("small")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (6, 6, 384, 256)


def test_tiny_is_tiny():
    cfg = load_config("tiny")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (2, 2, 32, 32)


def test_default_config_is_baby():
    assert load_config() == load_config("baby")


@pytest.mark.parametrize("name", ["tiny", "baby", "small"])
def test_shipped_configs_are_valid_and_known_keys_only(name):
    path = config.CONFIG_DIR / f"{name}.toml"
    with open(path, "rb") as f:
        values = tomllib.load(f)
    assert set(values) <= set(field_names())
    cfg = load_config(name)
    for key, value in values.items():
        assert getattr(cfg, key) == value, key
    # a path works as well as a name
    assert load_config(str(path)) == cfg


def test_all_shipped_configs_are_covered():
    assert {p.stem for p in config.CONFIG_DIR.glob("*.toml")} == {"tiny", "baby", "small"}


# --------------------------------------------------------------------------- overrides, types


def test_overrides_win_over_the_file_and_none_is_ignored():
    cfg = load_config("baby", {"lr": 5e-3, "n_layer": 2, "steps": None, "seed": 7})
    assert cfg.lr == 5e-3
    assert cfg.n_layer == 2
    assert cfg.seed == 7
    assert cfg.steps == 2000  # from baby.toml, the None override did not win
    assert cfg.n_embd == 128  # untouched file value


def test_file_wins_over_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("n_embd = 64\nlr = 1\n", encoding="utf-8")
    cfg = load_config(str(path))
    assert cfg.n_embd == 64
    assert cfg.lr == 1.0 and type(cfg.lr) is float  # int accepted for a float key
    assert cfg.n_layer == TrainConfig().n_layer


@pytest.mark.parametrize("key", ["lr", "min_lr", "weight_decay", "beta1", "grad_clip"])
def test_ints_accepted_for_float_keys(key):
    values = {key: 0, "lr": 1} if key != "lr" else {"lr": 1}
    cfg = make_config(values)
    assert type(getattr(cfg, key)) is float
    assert getattr(cfg, key) == values[key]


@pytest.mark.parametrize("key, value, expected", [
    ("n_layer", 2.0, "int"),
    ("n_layer", "2", "int"),
    ("n_layer", True, "int"),
    ("batch_size", 8.5, "int"),
    ("lr", "fast", "float"),
    ("lr", True, "float"),
    ("dtype", 32, "str"),
    ("data", ["a.h5"], "str"),
])
def test_wrong_types_rejected(key, value, expected):
    with pytest.raises(UserError) as err:
        make_config({key: value})
    assert str(err.value) == f"config {key} = {value!r}: expected a {expected}"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as err:
        make_config({"learning_rate": 1e-3})
    msg = str(err.value)
    assert "'learning_rate'" in msg
    assert "valid keys: " + ", ".join(field_names()) in msg


def test_unknown_key_in_file_names_key_file_and_valid_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("n_layer = 2\nlearning_rate = 0.1\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert "'learning_rate'" in msg and str(path) in msg
    for key in field_names():
        assert key in msg


def test_unknown_config_name_lists_shipped_ones():
    with pytest.raises(UserError) as err:
        load_config("huge")
    msg = str(err.value)
    assert "'huge' not found" in msg
    assert "baby, small, tiny" in msg


def test_missing_toml_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("content", [b"n_layer = \n", b"[[[", b'data = "\xff"\n'],
                         ids=["no-value", "bad-table", "not-utf8"])
def test_invalid_toml_is_a_user_error(tmp_path, content):
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_config(str(path))
    assert "not valid TOML" in str(err.value) and str(path) in str(err.value)


def test_cli_flags_for_every_key_default_to_none():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args([])
    assert args.config == "baby"
    assert all(getattr(args, key) is None for key in field_names())
    args = parser.parse_args(["--config", "tiny", "--n-embd", "64", "--lr", "1e-2",
                              "--dtype", "float64", "--eval-windows", "3"])
    assert (args.config, args.n_embd, args.lr, args.dtype, args.eval_windows) == \
        ("tiny", 64, 0.01, "float64", 3)
    cfg = load_config(args.config, {k: getattr(args, k) for k in field_names()})
    assert (cfg.n_embd, cfg.lr, cfg.dtype, cfg.n_layer) == (64, 0.01, "float64", 2)


# --------------------------------------------------------------------------- TOML round trip


def test_to_toml_round_trips_defaults():
    cfg = TrainConfig()
    assert make_config(tomllib.loads(cfg.to_toml())) == cfg


def test_to_toml_round_trips_every_field_changed():
    values = {
        "n_layer": 3, "n_head": 2, "n_embd": 48, "block_size": 18, "vocab_size": 300,
        "batch_size": 5, "steps": 7, "lr": 3.5e-4, "min_lr": 1e-5, "warmup_steps": 0,
        "weight_decay": 0.0, "beta1": 0.8, "beta2": 0.999, "grad_clip": 0.0, "seed": 0,
        "dtype": "float64", "device": "gpu", "cuda_aware_mpi": "no",
        "matmul": "float32",  # its other value, bf16, needs the cpu and float32 changed above
        "data": 'dir with "quotes"\\and\\backslash.h5',
        "log_interval": 1, "eval_interval": 3, "eval_windows": 1, "sample_tokens": 0,
        "dp": 2, "micro_batches": 3, "bucket_mb": 0.25, "zero": 1, "overlap": False,
        "check_interval": 0, "pp": 1, "schedule": "gpipe", "chunks": 1, "partition": "uniform",
        "timeout": 12.5, "save_interval": 50, "keep": 0, "max_skips": 1,
        "tp": 2, "sequence_parallel": True, "recompute": "selective",
        "mode": "ps", "servers": 2, "staleness": 1, "staleness_lr": True,
        "staleness_predict": False, "balance": "dynamic",
        "straggler": "1:5", "compress": "topk", "compress_ratio": 0.5, "compress_rank": 2,
        "compress_warmup": 7, "n_classes": 3, "pool": "mean", "head_lr_scale": 2.5,
    }
    assert set(values) == set(field_names())  # the test covers every key
    cfg = make_config(dict(values))
    assert {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == values
    text = cfg.to_toml()
    parsed = tomllib.loads(text)
    assert parsed == values
    assert make_config(parsed) == cfg
    assert list(parsed) == field_names()  # one line per key, in field order
    assert len(text.splitlines()) == len(field_names())


# --------------------------------------------------------------------------- validation

def test_data_parallel_keys():
    cfg = make_config({"dp": 4, "micro_batches": 2, "bucket_mb": 0.5, "zero": 1,
                       "overlap": False})
    assert (cfg.dp, cfg.micro_batches, cfg.bucket_mb, cfg.zero, cfg.overlap) == (4, 2, 0.5, 1,
                                                                                 False)
    for key, value, expected in (("bucket_mb", 0.0, "a bucket size in MB > 0"),
                                 ("bucket_mb", -1.0, "a bucket size in MB > 0"),
                                 ("zero", 2, "one of 0, 1"), ("dp", -1, "an integer >= 0"),
                                 ("micro_batches", 0, "an integer > 0")):
        with pytest.raises(UserError, match=re.escape(f"config {key} = {value!r}: expected "
                                                      f"{expected}")):
            make_config({key: value})
    with pytest.raises(UserError, match="overlap = 1: expected a bool"):
        make_config({"overlap": 1})


def test_pipeline_keys_and_impossible_splits():
    cfg = make_config({"n_layer": 8, "pp": 2, "schedule": "interleaved", "chunks": 2,
                       "micro_batches": 4, "batch_size": 8})
    assert (cfg.pp, cfg.schedule, cfg.chunks, cfg.partition) == (2, "interleaved", 2,
                                                                 "balanced")
    cases = [
        ({"n_layer": 4, "pp": 5}, "config pp * chunks = 5 * 1 exceeds n_layer = 4"),
        ({"pp": 2, "chunks": 2}, 'config chunks = 2 needs schedule = "interleaved", not '
                                 "'1f1b'"),
        ({"n_layer": 6, "pp": 2, "chunks": 2, "schedule": "interleaved", "micro_batches": 2},
         "config n_layer = 6 is not divisible by pp * chunks = 2 * 2"),
        ({"n_layer": 8, "pp": 2, "chunks": 2, "schedule": "interleaved", "micro_batches": 3},
         "config micro_batches = 3 is not a multiple of pp = 2"),
        ({"schedule": "zigzag"}, "config schedule = 'zigzag': expected one of 1f1b, gpipe, "
                                 "interleaved"),
        ({"timeout": 0.0}, "config timeout = 0.0: expected a number of seconds > 0"),
        ({"n_head": 6, "n_embd": 48, "tp": 4}, "config n_head = 6 is not divisible by tp = 4"),
        ({"n_head": 4, "tp": 2, "block_size": 63, "sequence_parallel": True},
         "config block_size = 63 is not divisible by tp = 2 with sequence_parallel"),
        ({"recompute": "some"}, "config recompute = 'some': expected one of none, "
                                "selective, full"),
    ]
    for values, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            make_config(values)


def test_boolean_flags():
    assert config.parse_bool("false") is False and config.parse_bool("On") is True
    with pytest.raises(argparse.ArgumentTypeError, match="'maybe' is not a boolean"):
        config.parse_bool("maybe")


BAD_VALUES = (
    [(key, 0, "an integer > 0") for key in config.POSITIVE_INTS]
    + [(key, -3, "an integer > 0") for key in config.POSITIVE_INTS]
    + [
        ("warmup_steps", -1, "an integer >= 0"),
        ("sample_tokens", -1, "an integer >= 0"),
        ("seed", -1, "an integer >= 0"),
        ("lr", 0.0, "a number > 0"),
        ("lr", -1e-3, "a number > 0"),
        ("lr", math.nan, "a number > 0"),
        ("min_lr", -1e-5, "a number in [0, lr = 0.001]"),
        ("min_lr", 0.5, "a number in [0, lr = 0.001]"),
        ("beta1", 1.0, "a number in [0, 1)"),
        ("beta1", -0.1, "a number in [0, 1)"),
        ("beta2", 1.5, "a number in [0, 1)"),
        ("weight_decay", -0.1, "a number >= 0"),
        ("weight_decay", math.nan, "a number >= 0"),
        ("grad_clip", -1.0, "a number >= 0"),
        ("dtype", "float16", "one of float32, float64, bf16, fp16"),
        ("device", "tpu", "one of cpu, gpu"),
        ("n_classes", -1, "an integer >= 0"),
        ("pool", "max", "one of last, mean"),
        ("head_lr_scale", 0.0, "a number > 0"),
    ]
)


@pytest.mark.parametrize("key, value, expected", BAD_VALUES,
                         ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_validate_names_key_value_and_expectation(key, value, expected):
    with pytest.raises(UserError) as err:
        make_config({"lr": 1e-3, key: value})
    assert str(err.value) == f"config {key} = {value!r}: expected {expected}"
    # validate() on its own (bypassing make_config's type checks) says the same
    with pytest.raises(UserError) as err2:
        validate(dataclasses.replace(TrainConfig(), **{"lr": 1e-3, key: value}))
    assert str(err2.value) == str(err.value)


def test_every_positive_int_key_is_a_config_field():
    assert set(config.POSITIVE_INTS) <= set(field_names())
    assert set(config.CHOICES) <= set(field_names())


def test_n_embd_divisible_by_n_head():
    with pytest.raises(UserError) as err:
        make_config({"n_embd": 30, "n_head": 4})
    msg = str(err.value)
    assert "n_embd = 30" in msg and "n_head = 4" in msg and "n_embd % n_head == 0" in msg
    assert make_config({"n_embd": 32, "n_head": 4}).n_embd == 32


def test_boundary_values_accepted():
    cfg = make_config({"warmup_steps": 0, "sample_tokens": 0, "seed": 0, "min_lr": 0.0,
                       "beta1": 0.0, "weight_decay": 0.0, "grad_clip": 0.0, "lr": 2e-3,
                       "n_layer": 1, "n_head": 1, "n_embd": 1})
    assert cfg.min_lr == 0.0 and cfg.beta1 == 0.0 and cfg.n_embd == 1
    assert make_config({"lr": 2e-3, "min_lr": 2e-3}).min_lr == 2e-3  # min_lr == lr is fine


def test_model_config_matches():
    cfg = load_config("tiny")
    m = cfg.model_config()
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (2, 2, 32, 32, 256)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16_bit_training_is_refused_on_the_cpu(dtype):
    with pytest.raises(UserError, match=rf"dtype = '{dtype}' needs device = 'gpu'.*expected "
                                        r"dtype float32 or float64 with device = 'cpu'"):
        make_config({"dtype": dtype})


def test_16_bit_training_does_not_run_with_a_parameter_server():
    with pytest.raises(UserError, match=r"dtype = 'bf16' does not run with a parameter server "
                                        r"\(mode = 'ps'\): expected mode 'ring'"):
        make_config({"dtype": "bf16", "device": "gpu", "mode": "ps"})
    make_config({"dtype": "bf16", "device": "gpu", "pp": 2, "tp": 2})  # any ring layout


@pytest.mark.parametrize("values", [{"device": "gpu"}, {"dtype": "float64"}],
                         ids=["gpu", "float64"])
def test_bf16_products_only_round_float32_on_the_cpu(values):
    with pytest.raises(UserError, match=r"matmul = 'bf16' rounds float32 products on the CPU.*"
                                        r"expected device 'cpu' and dtype 'float32'"):
        make_config({"matmul": "bf16", **values})
    assert make_config({"matmul": "bf16"}).matmul == "bf16"
