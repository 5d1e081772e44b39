"""`python -m app plan`: the layouts it prints, their commands, rejections and bad input."""
import re
import shlex

import pytest

from app import trainer
from app.__main__ import Parser, main
from app.config import field_names, load_config
from app.costmodel import MODELS
from app.parallel.layout import plan as layout_plan
from app.plan import megatron_flops

FAST = ["plan", "--cluster", "h100-node"]  # no calibration: the laptop preset measures


def run_plan(capsys, *flags):
    status = main([*FAST, *flags])
    out, err = capsys.readouterr()
    return status, out, err


def accepted_by_the_trainer(command):
    """The train flags of `command`, parsed and validated as `app train` would."""
    words = shlex.split(command)
    flags = words[words.index(next(w for w in words if w.startswith("slurm/"))) + 1:]
    parser = Parser()
    trainer.add_arguments(parser)
    args = parser.parse_args(flags)
    cfg = load_config(args.config, {name: getattr(args, name) for name in field_names()})
    world = int(re.search(r"--ntasks-per-node=(\d+)", command)[1]) * \
        int(re.search(r"-N (\d+)", command)[1])
    return cfg, layout_plan(cfg, world)


def test_prints_the_top_layouts_each_with_a_command_the_trainer_accepts(capsys):
    status, out, _ = run_plan(capsys, "--model", "small", "--top", "4", "--global-batch", "16")
    assert status == 0
    commands = [line.split(None, 1)[1] for line in out.splitlines()
                if line.split()[1:2] == ["sbatch"]]
    assert len(commands) == 4
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ dp=", line)]
    assert len(rows) == 4
    for row, command in zip(rows, commands):
        cfg, layout = accepted_by_the_trainer(command)
        assert f"dp={layout.dp} tp={layout.tp} pp={layout.pp}" in row
        assert cfg.batch_size == 16 and cfg.n_layer == 6 and cfg.device == "gpu"
    speeds = [float(row.split("|")[0].split()[-2]) for row in rows]
    assert speeds == sorted(speeds, reverse=True)


def test_a_model_given_by_its_sizes_gets_them_as_flags(capsys):
    status, out, _ = run_plan(capsys, "--model", "124M", "--n-layer", "4", "--top", "1",
                              "--global-batch", "8")
    assert status == 0
    command = next(line for line in out.splitlines() if "sbatch" in line)
    cfg, _ = accepted_by_the_trainer(command)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (4, 12, 768, 50257)


def test_layouts_that_do_not_fit_are_rejected_and_counted(capsys):
    status, out, _ = run_plan(capsys, "--model", "1.3B", "--global-batch", "64",
                              "--device-memory-gb", "20")
    assert status == 0
    counted = re.search(r"(\d+) layouts: (\d+) rejected: (\d+) because parameters", out)
    assert counted and 0 < int(counted[2]) < int(counted[1])
    for line in out.splitlines():
        if re.match(r"\s+\d+ dp=", line):
            assert float(line.split("|")[-1]) <= 20


def test_nothing_fits_is_one_line(capsys):
    status, _, err = run_plan(capsys, "--model", "1.3B", "--device-memory-gb", "1")
    assert status == 2
    assert err.count("\n") == 1 and "no layout of 1.3B fits in 1.0 GB" in err


@pytest.mark.parametrize("flags,expected", [
    (["--model", "2B"], "--model '2B' is not known: expected one of"),
    (["--model", "baby", "--n-embd", "130"], "--n-embd 130 is not divisible by --n-head 4"),
    (["--top", "0"], "--top 0: expected a number > 0"),
    (["--cluster", "dgx"], "--cluster 'dgx' is not known"),
    (["--nodes", "2"], "--nodes 2 with --cluster h100-node: expected 1"),
    (["--global-batch", "-3"], "--global-batch -3: expected a number > 0"),
])
def test_bad_input_is_one_line_naming_the_value(capsys, flags, expected):
    status, out, err = run_plan(capsys, *flags)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and expected in err


def test_megatron_flops_is_their_formula():
    # Narayanan et al.: 96 B s l h^2 (1 + s/6h + V/16lh), by hand for B = 3072, s = 2048,
    # l = 128, h = 25600, V = 51200: 5.066e19 * (1 + 0.01333 + 0.00098); at their 502
    # PFLOP/s a step took about 102 s
    assert megatron_flops(MODELS["1T"], 3072) == pytest.approx(5.138e19, rel=1e-3)
