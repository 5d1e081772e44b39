"""Equivalence: data parallelism (plain and ZeRO-1, with and without gradient accumulation)
trains the same model as one process on the same global batch, in float64.

Run under `mpiexec -n 4`: DP=2 runs in two groups of 2 ranks at once, DP=4 on all four.
Every rank also computes the single-process reference itself (COMM_SELF), so comparing
needs no communication until the final verdict.
"""
import numpy as np
import pytest

from app.config import TrainConfig, make_config
from app.data import BatchLoader, TokenData
from app.prepare import prepare
from app.parallel.engine import TrainStep
from app.trainer import train
from models import gpt
from models.optim import lr_at
from tests.mpi_util import Verdict, groups_of, shared_tmpdir, skip_unless_ranks

MPI = pytest.importorskip("mpi4py.MPI")

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256)
BATCH, STEPS, SEED = 8, 5, 7
RTOL = 1e-5


def corpus(tmpdir):
    text = " ".join(f"token{i % 97} word{i % 13}" for i in range(3000))
    (tmpdir / "c.txt").write_text(text, encoding="utf-8")
    prepare([tmpdir / "c.txt"], tmpdir / "c.h5")
    return tmpdir / "c.h5"


def run_steps(data_path, comm, options):
    """STEPS optimizer steps of the tiny GPT; returns (losses, final flat parameters)."""
    params = gpt.init_params(CFG, seed=SEED, dtype=np.float64)
    step = TrainStep(CFG, params, options, comm if comm.Get_size() > 1 else None)
    rank, size = comm.Get_rank(), comm.Get_size()
    losses = []
    with TokenData(data_path) as data:
        loader = BatchLoader(data, "train", CFG.block_size, BATCH, seed=SEED)
        for s in range(STEPS):
            x, y = loader.batch(s, rank, size)
            loss, _ = step(x, y, lr_at(s, 3e-3, 3e-4, 2, STEPS))
            losses.append(loss)
    return losses, params.flat.copy()


LAYOUTS = [(dp, zero, micro) for dp in (2, 4) for zero in (0, 1) for micro in (1, 2)]


@pytest.fixture(scope="module")
def data_path():
    """One corpus for the module, written by rank 0 into a directory every rank sees."""
    world, verdict, path = MPI.COMM_WORLD, Verdict(), None
    with shared_tmpdir(world) as tmpdir:
        if world.Get_rank() == 0:
            with verdict.guard("corpus"):
                path = corpus(tmpdir)
        verdict.check(world)  # a failure here errs on every rank, none waits in bcast
        yield world.bcast(path, root=0)


_references = {}  # data path -> the single-process run, computed once by each rank


def reference(data_path):
    """One process, one micro-batch (COMM_SELF: no communication, so no rank waits on it)."""
    if data_path not in _references:
        _references[data_path] = run_steps(data_path, MPI.COMM_SELF, TrainConfig())
    return _references[data_path]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dp, zero, micro", LAYOUTS,
                         ids=[f"dp{dp}-zero{zero}-micro{micro}" for dp, zero, micro in LAYOUTS])
def test_dp_layout_matches_one_process(data_path, dp, zero, micro):
    skip_unless_ranks(dp, f"dp={dp}")
    world, verdict = MPI.COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        ref_losses, ref_flat = reference(data_path)
    group = groups_of(world, dp)
    if group is not None:
        name = f"dp={dp} zero={zero} micro={micro}"
        with verdict.guard(name):
            # small buckets: many of them, so overlap and ordering are exercised
            options = TrainConfig(micro_batches=micro, zero=zero, bucket_mb=0.02)
            losses, flat = run_steps(data_path, group, options)
            verdict.close(f"{name} losses", losses, ref_losses, RTOL)
            verdict.close(f"{name} parameters", flat, ref_flat, RTOL, atol=1e-12)
        group.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_trainer_with_dp2_zero_and_accumulation_matches_one_process():
    """The whole trainer: grid, slicing, validation shared over ranks, files on rank 0."""
    world = MPI.COMM_WORLD
    verdict = Verdict()
    with shared_tmpdir(world) as tmpdir:
        data_path = world.bcast(corpus(tmpdir) if world.Get_rank() == 0 else None, root=0)
        cfg = make_config(dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8,
                               steps=STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                               dtype="float64", data=str(data_path), log_interval=1,
                               eval_interval=2, eval_windows=6, sample_tokens=0, seed=SEED,
                               zero=1, micro_batches=2, bucket_mb=0.02, check_interval=1))
        with verdict.guard("reference"):
            ref = train(cfg, tmpdir / f"ref{world.Get_rank()}", peak_gflops=1.0,
                        log=lambda *a: None, comm=MPI.COMM_SELF)
        group = groups_of(world, 2)
        if group is not None:
            with verdict.guard("dp=2"):
                run_dir = tmpdir / f"dp{world.Get_rank() // 2}"
                got = train(cfg, run_dir, peak_gflops=1.0, log=lambda *a: None, comm=group)
                verdict.close("losses", got["loss"], ref["loss"], RTOL)
                verdict.close("val", list(got["val"].values()), list(ref["val"].values()),
                              RTOL)
                verdict.close("parameters", got["params"].flat, ref["params"].flat, RTOL,
                              atol=1e-12)
                if group.Get_rank() == 0:
                    assert (run_dir / "params.h5").exists() and (run_dir / "metrics.jsonl").exists()
            group.Free()
        verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_replica_check_fails_on_every_rank_when_one_rank_drifts():
    from app.parallel.state import check_replicas_agree
    world = MPI.COMM_WORLD
    params = gpt.init_params(CFG, seed=SEED, dtype=np.float64)
    check_replicas_agree(params, world, step=0)  # identical: passes everywhere
    if world.Get_rank() == world.Get_size() - 1:
        params["h.1.mlp.c_fc.bias"][3] += 1e-12
    # every rank gathers all digests, so every rank raises: none waits on a peer
    with pytest.raises(RuntimeError, match="parameters differ across data-parallel ranks at "
                                           "step 7"):
        check_replicas_agree(params, world, step=7)
