"""Equivalence: every dp x pp x tp layout of the one step engine (any schedule, ZeRO-1,
sequence parallelism, activation recomputation) trains the same model as one process on
the same global batch, in float64: per-step losses and final parameters, rtol 1e-5.

In-process cases run under `mpiexec -n 4` (each layout on all four ranks; every rank also
computes the single-process reference itself); (2,2,2) runs when 8 ranks are given
(`make test NP=8`). One case runs the real CLI: `mpiexec -n 4 python -m app train --tp 2
--pp 2` against `python -m app train` on one process.
"""
import json

import h5py
import numpy as np
import pytest

from app.config import TrainConfig
from app.parallel.engine import Comms, StepEngine, TrainStep
from app.parallel.state import gather_full_params
from comm.grid import ProcessGrid
from models import gpt, sharding
from models.optim import lr_at
from tests.mpi_util import Verdict, against_reference, groups_of, skip_unless_ranks

# `tiny` with 4 heads (so that tp = 4 has a head per rank) and 8 blocks (so that pp = 4
# interleaves 2 chunks); a vocabulary that tp = 4 must pad (257 -> 260).
CFG = gpt.GPTConfig(n_layer=8, n_head=4, n_embd=32, block_size=16, vocab_size=257)
BATCH, STEPS, SEED, RTOL = 8, 5, 11, 1e-5


def global_batch(step):
    rng = np.random.default_rng([SEED, step])
    tokens = rng.integers(0, CFG.vocab_size, (BATCH, CFG.block_size + 1))
    return tokens[:, :-1], tokens[:, 1:]


def lr(step):
    return lr_at(step, 3e-3, 3e-4, 2, STEPS)


_reference = []


def reference():
    """One process, one micro-batch, the whole global batch (no communication)."""
    if not _reference:
        params = gpt.init_params(CFG, SEED, np, np.float64)
        step = TrainStep(CFG, params, TrainConfig())
        losses = [step(*global_batch(s), lr(s))[0] for s in range(STEPS)]
        _reference.append((losses, params))
    return _reference[0]


def run_layout(comm, dp, pp, tp, schedule="1f1b", micro=1, zero=0, sp=False,
               recompute="none", compute=None):
    """STEPS steps of the layout on `comm`; returns (losses, whole parameters, engine, grid)."""
    grid = ProcessGrid(dp, pp, tp, comm)
    chunks = 2 if schedule == "interleaved" else 1
    options = TrainConfig(micro_batches=micro, zero=zero, bucket_mb=0.01)
    engine = StepEngine(CFG, options, Comms.of_grid(grid), schedule=schedule, chunks=chunks,
                        seed=SEED, dtype=np.float64, timeout=60, sequence_parallel=sp,
                        recompute=recompute, compute_dtype=compute)
    share, rank = BATCH // dp, grid.coords.dp
    losses = []
    for s in range(STEPS):
        x, y = global_batch(s)
        part = slice(rank * share, (rank + 1) * share)
        losses.append(engine(x[part], y[part], lr(s))[0])
    return losses, gather_full_params(engine, np), engine, grid


LAYOUTS = [  # (dp, pp, tp, options)
    (1, 1, 4, {}), (2, 1, 2, {}), (4, 1, 1, {}),
    (1, 2, 2, {"micro": 2}), (1, 2, 2, {"schedule": "interleaved", "micro": 2}),
    (1, 4, 1, {"micro": 4}), (1, 4, 1, {"schedule": "interleaved", "micro": 4}),
    (2, 2, 1, {"micro": 2}), (2, 2, 1, {"schedule": "interleaved", "micro": 2}),
    (2, 2, 1, {"micro": 2, "zero": 1}), (2, 1, 2, {"zero": 1, "micro": 2}),
    (1, 1, 4, {"sp": True}), (2, 1, 2, {"sp": True}),
    (2, 2, 1, {"micro": 2, "recompute": "selective"}),
    (2, 2, 1, {"micro": 2, "recompute": "full"}),
    (1, 1, 4, {"recompute": "selective"}), (1, 1, 4, {"recompute": "full", "sp": True}),
]


def name_of(dp, pp, tp, options):
    return f"dp{dp}-pp{pp}-tp{tp}" + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("dp, pp, tp, options", LAYOUTS,
                         ids=[name_of(*layout) for layout in LAYOUTS])
def test_layout_matches_one_process(dp, pp, tp, options):
    skip_unless_ranks(4, name_of(dp, pp, tp, options))
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        ref_losses, ref_params = reference()
    group = groups_of(world, 4)
    if group is not None:
        name = name_of(dp, pp, tp, options)
        with verdict.guard(name):
            losses, params, _, grid = run_layout(group, dp, pp, tp, **options)
            close_to_reference(verdict, name, losses, params, ref_losses, ref_params)
            grid.free()
        group.Free()
    verdict.check(world)


def close_to_reference(verdict, name, losses, params, ref_losses, ref_params):
    verdict.close(f"{name} losses", losses, ref_losses, RTOL)
    for pname in gpt.param_shapes(CFG):
        verdict.close(f"{name} {pname}", params[pname], ref_params[pname], RTOL, atol=1e-12)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("dp, pp, tp, options", [(4, 1, 1, {}), (2, 2, 1, {"micro": 2})],
                         ids=["dp4", "pp2xdp2"])
def test_layouts_staged_through_host_buffers_match_one_process(dp, pp, tp, options):
    """The transfers of a GPU whose MPI cannot read device memory (comm/backend.py), forced
    on NumPy buffers: every ring segment and pipeline message goes through a host buffer."""
    from comm import backend
    name = "staged " + name_of(dp, pp, tp, options)
    skip_unless_ranks(4, name)
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        ref_losses, ref_params = reference()
    group = groups_of(world, 4)
    if group is not None:
        with verdict.guard(name):
            before = backend.staged_bytes[0]
            with backend.forced_host_staging():
                losses, params, _, grid = run_layout(group, dp, pp, tp, **options)
            assert backend.staged_bytes[0] > before, "nothing went through a host buffer"
            close_to_reference(verdict, name, losses, params, ref_losses, ref_params)
            grid.free()
        group.Free()
    verdict.check(world)


_mixed_reference = {}


def mixed_reference(compute):
    """One process in mixed precision: float64 masters, the model in `compute`."""
    if compute not in _mixed_reference:
        engine = StepEngine(CFG, TrainConfig(), params=gpt.init_params(CFG, SEED, np, np.float64),
                            compute_dtype=compute)
        losses = [engine(*global_batch(s), lr(s))[0] for s in range(STEPS)]
        _mixed_reference[compute] = (losses, engine.params)
    return _mixed_reference[compute]


MIXED = [(2, 2, 1, {"micro": 2}), (2, 1, 2, {"zero": 1, "sp": True}), (1, 2, 2, {"micro": 2})]


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("compute, rtol", [(np.float32, 1e-4), (np.float16, 3e-2)],
                         ids=["float32", "float16"])
@pytest.mark.parametrize("dp, pp, tp, options", MIXED, ids=[name_of(*m) for m in MIXED])
def test_mixed_precision_layouts_match_one_mixed_process(dp, pp, tp, options, compute, rtol):
    """Mixed precision (app/parallel/precision.py) in pipeline and tensor-parallel layouts:
    activations and their gradients travel, and tensor-parallel sums run, in the model's
    dtype. float32 over float64 masters compares tightly; float16 exercises the 2-byte
    transfers, within float16's rounding."""
    name = f"{np.dtype(compute)} " + name_of(dp, pp, tp, options)

    def run(group, verdict, expected):
        ref_losses, ref_params = expected
        losses, params, engine, grid = run_layout(group, dp, pp, tp, compute=compute, **options)
        assert engine.mixed is not None and engine.model_params.flat.dtype == compute
        verdict.close(f"{name} losses", losses, ref_losses, rtol)
        if compute == np.float32:
            verdict.close(f"{name} parameters", params.flat, ref_params.flat, 0, atol=1e-5)
        grid.free()

    against_reference(4, name, lambda: mixed_reference(compute), run)


@pytest.mark.mpi(min_size=8)
def test_dp2_pp2_tp2_on_eight_ranks_matches_one_process():
    skip_unless_ranks(8, "dp=2 x pp=2 x tp=2")
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        ref_losses, ref_params = reference()
    group = groups_of(world, 8)
    if group is not None:
        with verdict.guard("dp2-pp2-tp2"):
            losses, params, _, grid = run_layout(group, 2, 2, 2, micro=2, sp=True, zero=1)
            verdict.close("losses", losses, ref_losses, RTOL)
            verdict.close("parameters", params.flat, ref_params.flat, RTOL, atol=1e-12)
            grid.free()
        group.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("sp", [False, True], ids=["plain", "sequence-parallel"])
def test_replicated_gradients_are_identical_on_every_tensor_parallel_rank(sp):
    """LayerNorms, row-parallel biases and wpe are replicated: their (reduced) gradients
    must come out bit for bit the same on each tensor-parallel rank, or the replicas drift."""
    skip_unless_ranks(4, "tp=4")
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    group = groups_of(world, 4)
    if group is not None:
        with verdict.guard("run"):
            _, _, engine, grid = run_layout(group, 1, 1, 4, sp=sp)
        replicated = [n for n in gpt.param_shapes(CFG) if sharding.tp_pieces(n, CFG, 4, 0) is None]
        mine = {n: engine.grads[n].copy() for n in replicated}
        everyone = grid.tp_comm.allgather(mine)
        with verdict.guard("identical"):
            assert len(replicated) == 2 + 6 * CFG.n_layer + 1, replicated  # ln_f, blocks, wpe
            for n in replicated:
                for r, theirs in enumerate(everyone):
                    np.testing.assert_array_equal(theirs[n], mine[n], err_msg=f"{n} rank {r}")
                assert np.any(mine[n] != 0), n
        grid.free()
        group.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=4)
def test_tensor_parallel_halves_block_parameters_and_sequence_parallel_activations():
    skip_unless_ranks(4, "tp=2")
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    group = groups_of(world, 4)
    if group is not None:
        sizes = {}
        with verdict.guard("runs"):
            for tp, sp in ((1, False), (2, False), (2, True)):
                _, _, engine, grid = run_layout(group, 4 // tp, 1, tp, sp=sp)
                sizes[tp, sp] = (sum(engine.params[n].size for n in engine.params.shapes
                                     if n.startswith("h.")), engine.peak_activation_bytes)
                grid.free()
        with verdict.guard("sizes"):
            ratio = sizes[2, False][0] / sizes[1, False][0]
            assert abs(ratio - 0.5) < 0.01, ratio  # only the replicated norms and biases stay
            # same rows per rank (dp halves with tp): sequence parallelism shrinks the rest
            assert sizes[2, True][1] < sizes[2, False][1], sizes
        group.Free()
    verdict.check(world)


def read_run(run):
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text()
              .splitlines() if '"loss"' in line]
    with h5py.File(run / "params.h5") as f:
        return losses, {name: f[name][()] for name in f}


def test_the_cli_with_tp2_pp2_matches_one_process(tmp_path):
    from app.prepare import prepare
    from app_util import app
    from conftest import corpus_text
    (tmp_path / "c.txt").write_text(corpus_text(3000), encoding="utf-8")
    prepare([tmp_path / "c.txt"], tmp_path / "c.h5")
    common = ["train", "--config", "tiny", "--n-head", "4", "--dtype", "float64", "--steps",
              "5", "--batch-size", "8", "--block-size", "16", "--sample-tokens", "0",
              "--eval-windows", "2", "--peak-gflops", "100", "--log-interval", "1",
              "--data", tmp_path / "c.h5"]
    one = app(*common, "--micro-batches", "2", "--out", tmp_path / "one", timeout=120)
    assert one.returncode == 0, one.stderr
    split = app(*common, "--tp", "2", "--pp", "2", "--micro-batches", "2", "--out",
                tmp_path / "split", n=4, timeout=180)
    assert split.returncode == 0, split.stderr
    assert "layout: dp=1 pp=2 tp=2" in split.stdout, split.stdout
    ref_losses, ref_params = read_run(tmp_path / "one")
    losses, params = read_run(tmp_path / "split")
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert set(params) == set(ref_params)
    for name, value in ref_params.items():
        assert params[name].shape == value.shape, name  # logical shapes, true vocabulary
        np.testing.assert_allclose(params[name], value, rtol=RTOL, atol=1e-12, err_msg=name)
