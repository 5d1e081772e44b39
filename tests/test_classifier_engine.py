"""The GPT as a sequence classifier (`n_classes` > 0) in the one step engine: its whole
gradient against finite differences, one engine step against a hand-written one, and under
`mpiexec -n 4` every layout against the single process (float64, rtol 1e-5), on random
token rows padded at the end with random lengths and labels.
"""
import numpy as np
import pytest

from app.config import TrainConfig
from app.parallel.engine import Comms, StepEngine, TrainStep
from app.parallel.state import gather_full_params
from models import gpt
from models.classifier import ClassTargets
from models.optim import lr_at
from tests.gradcheck import model_gradient_errors
from tests.mpi_util import Verdict, groups_of, skip_unless_ranks

POOLS = ("last", "mean")
BATCH, T, STEPS, SEED, RTOL = 8, 12, 5, 5, 1e-5  # rows shorter than block_size


def config(pool, **changes):
    return gpt.GPTConfig(**{"n_layer": 4, "n_head": 2, "n_embd": 16, "block_size": 16,
                            "vocab_size": 32, "n_classes": 3, "pool": pool, **changes})


def random_batch(rng, cfg, rows, length):
    """(rows, length) ids padded with 0 after random real lengths (1 and `length` among
    them), and their ClassTargets."""
    lengths = rng.integers(1, length + 1, rows)
    lengths[:2] = 1, length
    ids = rng.integers(1, cfg.vocab_size, (rows, length))
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids, ClassTargets(lengths, rng.integers(0, cfg.n_classes, rows))


def global_batch(cfg, step):
    return random_batch(np.random.default_rng([SEED, step]), cfg, BATCH, T)


def lr(step):
    return lr_at(step, 3e-3, 3e-4, 2, STEPS)


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("pool", POOLS)
def test_whole_gradient_matches_finite_differences(pool):
    """Every tensor, 6 random elements each; parameters nudged off the init (whose zero
    classifier sends no gradient into the trunk)."""
    cfg = config(pool, n_layer=2, n_embd=8, block_size=6)
    rng = np.random.default_rng(1)
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    params.flat += rng.normal(0.0, 0.2, params.size)
    ids, targets = random_batch(rng, cfg, 4, cfg.block_size)
    errors = model_gradient_errors(params, cfg, ids, targets, rng, max_samples=6)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-6, f"{worst}: {errors[worst]:.2e}"
    assert {"cls.weight", "cls.bias"} <= set(errors)


def test_zero_classifier_predicts_uniformly_and_decays_like_a_matrix():
    cfg = config("last")
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    assert params["cls.weight"].shape == (16, 3) and not params["cls.weight"].any()
    ids, targets = global_batch(cfg, 0)
    loss, _ = gpt.forward(params, cfg, ids, targets)
    assert loss == pytest.approx(np.log(3), rel=1e-12)
    np.testing.assert_array_equal(gpt.logits(params, cfg, ids, targets.lengths), 0.0)
    assert gpt.is_decayed("cls.weight") and not gpt.is_decayed("cls.bias")


def test_last_stage_holds_the_classifier_and_not_wte():
    """Without a tied head wte is the embedding's alone: chained stages give the whole
    model's gradients, each announced once when final."""
    cfg = config("mean", n_layer=3)
    rng = np.random.default_rng(6)
    p = gpt.init_params(cfg, seed=0, dtype=np.float64)
    p["cls.weight"][...] = rng.normal(0.0, 0.5, p["cls.weight"].shape)
    ids, targets = global_batch(cfg, 0)
    mask = gpt.layers.causal_mask(np, cfg.block_size, np.float64)
    whole_loss, cache = gpt.forward(p, cfg, ids, targets)
    whole = gpt.backward(cache, p.like())
    specs = [gpt.StageSpec(0, 1, True, False), gpt.StageSpec(1, 3, False, True)]
    last_names = gpt.stage_param_names(cfg, specs[1:])
    assert "wte" not in last_names and last_names[-2:] == ["cls.weight", "cls.bias"]
    grads = [gpt.FlatParams({n: p.shapes[n] for n in gpt.stage_param_names(cfg, [s])},
                            dtype=np.float64) for s in specs]
    for g in grads:
        g.flat[...] = np.nan  # backward must overwrite every gradient it owns
    announced = []
    act, c0 = gpt.stage_forward(p, cfg, specs[0], ids, None, mask)
    loss, c1 = gpt.stage_forward(p, cfg, specs[1], act, targets, mask)
    assert loss == whole_loss
    d_act = gpt.stage_backward(specs[1], c1, grads[1], 1.0, announced.extend)
    gpt.stage_backward(specs[0], c0, grads[0], d_act, announced.extend)
    assert sorted(announced) == sorted(gpt.param_shapes(cfg))
    for g in grads:
        for name, value in g.items():
            np.testing.assert_allclose(value, whole[name], rtol=1e-12, err_msg=name)


def hand_written_step(cfg, params, ids, targets, options, lr):
    """Forward, backward, global-norm clipping and AdamW's first step, written out."""
    loss, cache = gpt.forward(params, cfg, ids, targets)
    grads = gpt.backward(cache, params.like()).flat
    norm = np.sqrt(grads @ grads)
    if norm > options.grad_clip:
        grads = grads * options.grad_clip / (norm + 1e-6)
    b1, b2 = options.beta1, options.beta2
    m_hat = (1 - b1) * grads / (1 - b1)
    v_hat = (1 - b2) * grads ** 2 / (1 - b2)
    decay = np.concatenate([np.full(params[n].size, float(gpt.is_decayed(n))) for n in params])
    new = params.flat * (1 - lr * options.weight_decay * decay)
    return loss, new - lr * m_hat / (np.sqrt(v_hat) + 1e-8)


@pytest.mark.parametrize("pool", POOLS)
def test_one_engine_step_equals_the_hand_written_step(pool):
    """Two micro-batches: the engine cuts the targets with the ids."""
    cfg = config(pool)
    params = gpt.init_params(cfg, seed=SEED, dtype=np.float64)
    params["cls.weight"][...] = np.random.default_rng(2).normal(0.0, 0.5, (16, 3))
    ids, targets = global_batch(cfg, 0)
    options = TrainConfig(micro_batches=2)
    loss, expected = hand_written_step(cfg, params, ids, targets, options, 1e-2)
    engine_loss, _ = TrainStep(cfg, params, options)(ids, targets, 1e-2)
    assert engine_loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(params.flat, expected, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- mpiexec -n 4

_references = {}


def reference(pool):
    """One process on the whole global batch (each rank computes it, no communication)."""
    if pool not in _references:
        cfg = config(pool)
        params = gpt.init_params(cfg, SEED, np, np.float64)
        step = TrainStep(cfg, params, TrainConfig())
        losses = [step(*global_batch(cfg, s), lr(s))[0] for s in range(STEPS)]
        _references[pool] = losses, params
    return _references[pool]


def run_layout(comm, pool, dp, pp, tp, micro=1, zero=0, sp=False, schedule="1f1b"):
    """STEPS steps on `comm`; returns (losses, whole parameters)."""
    from comm.grid import ProcessGrid
    cfg = config(pool)
    grid = ProcessGrid(dp, pp, tp, comm)
    engine = StepEngine(cfg, TrainConfig(micro_batches=micro, zero=zero, bucket_mb=0.002),
                        Comms.of_grid(grid), schedule=schedule,
                        chunks=2 if schedule == "interleaved" else 1, seed=SEED,
                        dtype=np.float64, timeout=60, sequence_parallel=sp)
    share, rank = BATCH // dp, grid.coords.dp
    losses = []
    try:
        for s in range(STEPS):
            ids, targets = global_batch(cfg, s)
            part = slice(rank * share, (rank + 1) * share)
            losses.append(engine(ids[part], targets[part], lr(s))[0])
        return losses, gather_full_params(engine, np)
    finally:
        engine.free()
        grid.free()


LAYOUTS = [  # (dp, pp, tp, options); small buckets: ZeRO-1 shards cut through cls.*
    (4, 1, 1, {"zero": 1}), (2, 2, 1, {"micro": 2}), (2, 2, 1, {"micro": 2, "zero": 1}),
    (2, 2, 1, {"micro": 2, "schedule": "interleaved"}), (2, 1, 2, {"sp": True}),
    (1, 2, 2, {"micro": 2}),
]
CASES = [(pool, *layout) for pool in POOLS for layout in LAYOUTS]


def name_of(pool, dp, pp, tp, options):
    return f"{pool}-dp{dp}-pp{pp}-tp{tp}" + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("pool, dp, pp, tp, options", CASES,
                         ids=[name_of(*case) for case in CASES])
def test_layout_matches_one_process(pool, dp, pp, tp, options):
    name = name_of(pool, dp, pp, tp, options)
    skip_unless_ranks(4, name)
    world, verdict = pytest.importorskip("mpi4py.MPI").COMM_WORLD, Verdict()
    with verdict.guard("reference"):
        ref_losses, ref_params = reference(pool)
    group = groups_of(world, 4)
    if group is not None:
        with verdict.guard(name):
            losses, params = run_layout(group, pool, dp, pp, tp, **options)
            verdict.close(f"{name} losses", losses, ref_losses, RTOL)
            for pname in ref_params:
                verdict.close(f"{name} {pname}", params[pname], ref_params[pname], RTOL,
                              atol=1e-12)
        group.Free()
    verdict.check(world)
