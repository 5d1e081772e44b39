"""Equivalence: pipeline parallelism (GPipe, 1F1B, interleaved 1F1B; alone and with data
parallelism) trains the same model as one process on the same global batch, in float64.

Run under `mpiexec -n 4`: PP=2 runs in two groups of 2 ranks at once, PP=4 and DP=2 x PP=2
on all four. Each rank compares the parameters it holds, by name, with the reference.
"""
import numpy as np
import pytest

from app.config import TrainConfig
from app.parallel.engine import PipelineStep
from app.parallel.engine import TrainStep
from comm.grid import ProcessGrid
from models import gpt
from models.optim import lr_at
from tests.mpi_util import Verdict, groups_of, skip_unless_ranks

MPI = pytest.importorskip("mpi4py.MPI")

CFG = gpt.GPTConfig(n_layer=8, n_head=2, n_embd=16, block_size=8, vocab_size=32)
STEPS, SEED, RTOL = 5, 3, 1e-5


def global_batch(step, rows):
    rng = np.random.default_rng([SEED, step])
    tokens = rng.integers(0, CFG.vocab_size, (rows, CFG.block_size + 1))
    return tokens[:, :-1], tokens[:, 1:]


_references = {}  # rows -> the single-process run, computed once by each rank


def reference(rows):
    """One process on `rows` sequences a step (no communication, so no rank waits on it)."""
    if rows not in _references:
        params = gpt.init_params(CFG, SEED, np, np.float64)
        step = TrainStep(CFG, params, TrainConfig())
        losses = [step(*global_batch(s, rows), lr_at(s, 3e-3, 3e-4, 2, STEPS))[0]
                  for s in range(STEPS)]
        _references[rows] = losses, params
    return _references[rows]


def run_pipeline(pp_comm, dp_comm, schedule, m, chunks, rows):
    dp = dp_comm.Get_size() if dp_comm is not None else 1
    rank = dp_comm.Get_rank() if dp_comm is not None else 0
    step = PipelineStep(CFG, TrainConfig(micro_batches=m), pp_comm, dp_comm, schedule,
                        chunks, seed=SEED, timeout=60)
    share = rows // dp
    losses = []
    for s in range(STEPS):
        x, y = global_batch(s, rows)
        part = slice(rank * share, (rank + 1) * share)
        losses.append(step(x[part], y[part], lr_at(s, 3e-3, 3e-4, 2, STEPS))[0])
    return losses, step.params


def compare(verdict, name, got, ref):
    losses, params = got
    ref_losses, ref_params = ref
    verdict.close(f"{name} losses", losses, ref_losses, RTOL)
    for pname, value in params.items():
        verdict.close(f"{name} {pname}", value, ref_params[pname], RTOL, atol=1e-12)


def cases(p):
    for schedule in ("gpipe", "1f1b"):
        for m in (1, p, 2 * p + 1):
            yield p, schedule, m, 1
    for m in (p, 2 * p):  # interleaving needs a multiple of p micro-batches
        yield p, "interleaved", m, 2


PIPELINES = [*cases(2), *cases(4)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("p, schedule, m, chunks", PIPELINES,
                         ids=[f"pp{p}-{schedule}-m{m}" for p, schedule, m, _ in PIPELINES])
def test_pipeline_schedule_matches_one_process(p, schedule, m, chunks):
    skip_unless_ranks(p, f"pp={p}")
    world, verdict = MPI.COMM_WORLD, Verdict()
    group = groups_of(world, p)
    if group is not None:
        name = f"pp={p} {schedule} m={m}"
        with verdict.guard(name):
            compare(verdict, name, run_pipeline(group, None, schedule, m, chunks, m),
                    reference(m))
        group.Free()
    verdict.check(world)


DP2_PP2 = [("1f1b", 3, 1), ("gpipe", 2, 1), ("interleaved", 2, 2)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule, m, chunks", DP2_PP2,
                         ids=[f"{schedule}-m{m}" for schedule, m, _ in DP2_PP2])
def test_dp2_times_pp2_matches_one_process(schedule, m, chunks):
    skip_unless_ranks(4, "dp=2 x pp=2")
    world, verdict = MPI.COMM_WORLD, Verdict()
    sub = groups_of(world, 4)
    if sub is not None:
        grid = ProcessGrid(dp=2, pp=2, comm=sub)
        name = f"dp=2 pp=2 {schedule} m={m}"
        with verdict.guard(name):
            rows = 2 * m
            compare(verdict, name,
                    run_pipeline(grid.pp_comm, grid.dp_comm, schedule, m, chunks, rows),
                    reference(rows))
        grid.free()
        sub.Free()
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_trainer_with_pp2_matches_one_process():
    """The whole trainer with --pp 2 (balanced partition, 1F1B): losses, validation and
    the gathered parameters equal the single-process run."""
    from app.config import make_config
    from app.prepare import prepare
    from app.trainer import train
    from tests.mpi_util import shared_tmpdir
    world, verdict = MPI.COMM_WORLD, Verdict()
    with shared_tmpdir(world) as tmpdir:
        if world.Get_rank() == 0:
            (tmpdir / "c.txt").write_text(" ".join(f"w{i % 31}" for i in range(4000)))
            prepare([tmpdir / "c.txt"], tmpdir / "c.h5")
        world.Barrier()
        values = dict(n_layer=4, n_head=2, n_embd=16, block_size=8, batch_size=6, steps=4,
                      dtype="float64", data=str(tmpdir / "c.h5"), log_interval=1,
                      eval_interval=2, eval_windows=4, sample_tokens=0, seed=SEED,
                      micro_batches=3)
        with verdict.guard("reference"):
            ref = train(make_config(values), tmpdir / f"r{world.Get_rank()}", peak_gflops=1.0,
                        log=lambda *a: None, comm=MPI.COMM_SELF)
        group = groups_of(world, 2)
        if group is not None:
            with verdict.guard("pp=2"):
                lines = []
                cfg = make_config(dict(values, pp=2))
                got = train(cfg, tmpdir / f"p{world.Get_rank() // 2}", peak_gflops=1.0,
                            log=lines.append, comm=group)
                if group.Get_rank() == 0:  # the whole model's size, not one stage's
                    n_params = gpt.num_params(cfg.model_config())
                    assert any(line.startswith(f"model: {n_params:,} parameters")
                               for line in lines), lines
                    assert any(line.startswith("pipeline: pp=2 schedule=1f1b") for line in lines)
                verdict.close("losses", got["loss"], ref["loss"], RTOL)
                verdict.close("val", list(got["val"].values()), list(ref["val"].values()), RTOL)
                verdict.close("params", got["params"].flat, ref["params"].flat, RTOL, atol=1e-12)
            group.Free()
        verdict.check(world)
