"""Tensor-parallel layers (models.parallel): on SOLO they equal the unsplit layers and their
gradients match finite differences; under MPI, on groups of 2 and 4, each rank's outputs and
gradients equal the matching slices of the unsplit layer's, with and without sequence
parallelism."""
import numpy as np
import pytest

from models import layers, parallel
from models.parallel import SOLO
from tests.gradcheck import check_gradients

TOL = 1e-6
B, T, C, H = 2, 4, 8, 4
V = 11  # not a multiple of 2 or 4: the vocabulary gets padding rows


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def check(forward, backward, inputs, rng, max_samples=40):
    check_gradients(forward, backward, inputs, rng, TOL, max_samples)


# ---------------------------------------------------------------- one process: SOLO


def test_conjugate_operators_on_solo_are_identities(rng):
    x = rng.normal(size=(B, T, C))
    for name in ("copy", "reduce", "gather_sequence", "scatter_sequence"):
        forward = getattr(parallel, f"{name}_forward")
        backward = getattr(parallel, f"{name}_backward")
        y, cache = forward(x, SOLO)
        assert y is x, name
        dx, grads = backward(cache, x)
        assert dx is x and grads == {}, name


@pytest.mark.parametrize("layer, width", [("linear", 3), ("linear_gelu", 4)])
@pytest.mark.parametrize("sp", [False, True])
def test_column_layers_on_solo_are_the_unsplit_pair(rng, sp, layer, width):
    """column_linear_* is layers.linear_*, column_linear_gelu_* the fused linear_gelu_*."""
    forward = getattr(parallel, f"column_{layer}_forward")
    backward = getattr(parallel, f"column_{layer}_backward")
    x, w = rng.normal(size=(B, T, C)), rng.normal(size=(C, width * C))
    b = rng.normal(size=width * C)
    y, cache = forward(w, b, x, SOLO, sp)
    y_ref, cache_ref = getattr(layers, f"{layer}_forward")(w, b, x)
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.normal(size=y.shape)
    grads = {"weight": np.full_like(w, np.nan), "bias": np.full_like(b, np.nan)}
    dx, got = backward(cache, dy, grads)
    dx_ref, ref = getattr(layers, f"{layer}_backward")(cache_ref, dy)
    assert got is grads  # overwritten in place
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(got["weight"], ref["weight"])
    np.testing.assert_array_equal(got["bias"], ref["bias"])

    def gradients(cache, d):
        dx, g = backward(cache, d)
        return {"x": dx, "w": g["weight"], "b": g["bias"]}

    check(lambda: forward(w, b, x, SOLO, sp), gradients, {"x": x, "w": w, "b": b}, rng)


@pytest.mark.parametrize("sp", [False, True])
def test_row_linear_on_solo_is_linear(rng, sp):
    x, w, b = rng.normal(size=(B, T, 4 * C)), rng.normal(size=(4 * C, C)), rng.normal(size=C)
    y, cache = parallel.row_linear_forward(w, b, x, SOLO, sp)
    y_ref, cache_ref = layers.linear_forward(w, b, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-14)  # bias added after the GEMM
    dy = rng.normal(size=y.shape)
    grads = {"weight": np.full_like(w, np.nan), "bias": np.full_like(b, np.nan)}
    dx, got = parallel.row_linear_backward(cache, dy, grads)
    dx_ref, ref = layers.linear_backward(cache_ref, dy)
    assert got is grads
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(got["weight"], ref["weight"])
    np.testing.assert_allclose(got["bias"], ref["bias"], rtol=1e-12)

    def backward(cache, d):
        dx, g = parallel.row_linear_backward(cache, d)
        return {"x": dx, "w": g["weight"], "b": g["bias"]}

    check(lambda: parallel.row_linear_forward(w, b, x, SOLO, sp), backward,
          {"x": x, "w": w, "b": b}, rng)


@pytest.mark.parametrize("sp", [False, True])
def test_vocab_embedding_on_solo_is_embedding_without_positions(rng, sp):
    wte = rng.normal(size=(V, C))
    idx = rng.integers(0, V, size=(B, T))
    idx[0, :3] = 4  # repeated ids must accumulate
    y, cache = parallel.vocab_embedding_forward(wte, 0, idx, SOLO, sp)
    y_ref, cache_ref = layers.embedding_forward(wte, np.zeros((T, C)), idx)
    np.testing.assert_array_equal(y, y_ref)
    dout = rng.normal(size=y.shape)
    start = rng.normal(size=wte.shape)
    dx, got = parallel.vocab_embedding_backward(cache, dout, {"wte": start.copy()})
    _, ref = layers.embedding_backward(cache_ref, dout)
    assert dx is None
    np.testing.assert_allclose(got["wte"], start + ref["wte"], rtol=1e-12)  # accumulated

    check(lambda: parallel.vocab_embedding_forward(wte, 0, idx, SOLO, sp),
          lambda c, d: parallel.vocab_embedding_backward(c, d)[1], {"wte": wte}, rng)


def test_vocab_embedding_looks_up_only_its_rows(rng):
    """A shard of rows [4, 8): other ids give zero rows and no gradient."""
    wte = rng.normal(size=(4, C))
    idx = np.array([[0, 4, 7, 8, 5, 5, 10, 3]])
    y, cache = parallel.vocab_embedding_forward(wte, 4, idx, SOLO)
    ours = (idx[0] >= 4) & (idx[0] < 8)
    np.testing.assert_array_equal(y[0, ours], wte[idx[0, ours] - 4])
    np.testing.assert_array_equal(y[0, ~ours], 0)
    dout = rng.normal(size=y.shape)
    _, grads = parallel.vocab_embedding_backward(cache, dout)
    expected = np.zeros_like(wte)
    np.add.at(expected, idx[0, ours] - 4, dout[0, ours])
    np.testing.assert_allclose(grads["wte"], expected, rtol=1e-12)
    _, none = parallel.vocab_embedding_forward(wte, 100, idx, SOLO)  # no id of ours at all
    _, grads = parallel.vocab_embedding_backward(none, dout)
    np.testing.assert_array_equal(grads["wte"], 0)


def test_vocab_cross_entropy_on_solo_is_softmax_cross_entropy(rng):
    logits = rng.normal(size=(V, B * T)) * 3
    targets = rng.integers(0, V, size=B * T)
    loss, cache = parallel.vocab_cross_entropy_forward(logits.copy(), targets, 0, V, SOLO)
    loss_ref, cache_ref = layers.softmax_cross_entropy_forward(logits.copy(), targets)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    dlogits, _ = parallel.vocab_cross_entropy_backward(cache, 0.7)
    dlogits_ref, _ = layers.softmax_cross_entropy_backward(cache_ref, 0.7)
    np.testing.assert_allclose(dlogits, dlogits_ref, rtol=1e-12, atol=1e-15)


def test_vocab_cross_entropy_ignores_padding_rows(rng):
    """Padding rows (ids >= vocab_size), however large, change neither the loss nor the
    other rows' gradients, and get exactly zero gradient."""
    padded = 16
    logits = rng.normal(size=(padded, B * T)) * 3
    logits[V:] = 1e3 * rng.normal(size=(padded - V, B * T)) + 800  # exp would overflow
    targets = rng.integers(0, V, size=B * T)
    targets[0] = V - 1
    loss, cache = parallel.vocab_cross_entropy_forward(logits, targets, 0, V, SOLO)
    loss_ref, cache_ref = layers.softmax_cross_entropy_forward(logits[:V].copy(), targets)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    dlogits, _ = parallel.vocab_cross_entropy_backward(cache)
    dlogits_ref, _ = layers.softmax_cross_entropy_backward(cache_ref)
    np.testing.assert_allclose(dlogits[:V], dlogits_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(dlogits[V:], 0)

    logits[V:] = rng.normal(size=(padded - V, B * T))  # finite differences need sane values

    def forward():
        return parallel.vocab_cross_entropy_forward(logits, targets, 0, V, SOLO)

    check(forward, lambda c, d: {"logits": parallel.vocab_cross_entropy_backward(c, d)[0]},
          {"logits": logits}, rng, 80)


def test_vocab_shard():
    assert parallel.vocab_shard(11, 2, 0) == (12, 0, 6)
    assert parallel.vocab_shard(11, 2, 1) == (12, 6, 12)
    assert [parallel.vocab_shard(11, 4, r) for r in range(4)] == \
        [(12, 0, 3), (12, 3, 6), (12, 6, 9), (12, 9, 12)]
    assert parallel.vocab_shard(11, 4, 3, multiple=4) == (16, 12, 16)
    assert parallel.vocab_shard(256, 4, 1, multiple=64) == (256, 64, 128)
    assert parallel.vocab_shard(50257, 1, 0, multiple=64) == (50304, 0, 50304)
    assert parallel.vocab_shard(12, 1, 0) == (12, 0, 12)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_columns_select_whole_heads(rng, tp):
    """Every rank's local attention, side by side, is the full attention, and the local
    gradients are the full gradient's columns."""
    qkv = rng.normal(size=(B, T, 3 * C))
    y, cache = layers.attention_forward(qkv, H)
    dy = rng.normal(size=y.shape)
    dqkv, _ = layers.attention_backward(cache, dy)
    columns = [parallel.qkv_columns(C, tp, r) for r in range(tp)]
    assert np.array_equal(np.sort(np.concatenate(columns)), np.arange(3 * C))
    width = C // tp
    local_ys = []
    for r, cols in enumerate(columns):
        y_r, cache_r = layers.attention_forward(qkv[..., cols], H // tp)
        local_ys.append(y_r)
        dqkv_r, _ = layers.attention_backward(cache_r, dy[..., r * width:(r + 1) * width])
        np.testing.assert_allclose(dqkv_r, dqkv[..., cols], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.concatenate(local_ys, axis=-1), y, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- under mpiexec
# Every rank builds the same full tensors from one seed, runs its shard, and compares with
# its slices of the unsplit layer. Runs sit in guards apart from the comparisons, so a failed
# comparison never makes one rank skip a collective that the others enter.

RTOL, ATOL = 1e-10, 1e-13  # float64; atol for sums that cancel to ~0


@pytest.fixture(params=[2, 4], ids=["tp2", "tp4"])
def tp_group(request):
    """(world, verdict, RingGroup or None for ranks left out) on groups of `tp` ranks."""
    from mpi4py import MPI

    from comm.group import RingGroup
    from tests.mpi_util import Verdict, groups_of, skip_unless_ranks
    tp = request.param
    if tp > 2:
        skip_unless_ranks(tp, f"a tensor-parallel group of {tp}")
    world = MPI.COMM_WORLD
    sub = groups_of(world, tp)
    yield world, Verdict(), (RingGroup(sub) if sub is not None else None)
    if sub is not None:
        sub.Free()


def sequence_slice(group):
    """This rank's positions along T under sequence parallelism."""
    n = T // group.size
    return slice(group.rank * n, (group.rank + 1) * n)


def feature_slice(width, group):
    n = width // group.size
    return slice(group.rank * n, (group.rank + 1) * n)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_column_linear_matches_unsplit(tp_group, sp):
    world, verdict, group = tp_group
    if group is not None:
        rng = np.random.default_rng(1)
        x, w, b = rng.normal(size=(B, T, C)), rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C)
        dy = rng.normal(size=(B, T, 3 * C))
        y_ref, cache_ref = layers.linear_forward(w, b, x)
        dx_ref, g_ref = layers.linear_backward(cache_ref, dy)
        cols, seq = feature_slice(3 * C, group), sequence_slice(group)
        x_in = x[:, seq].copy() if sp else x
        with verdict.guard("run"):
            y, cache = parallel.column_linear_forward(w[:, cols].copy(), b[cols].copy(), x_in,
                                                      group, sp)
            grads = {"weight": np.full((C, 3 * C // group.size), np.nan),
                     "bias": np.full(3 * C // group.size, np.nan)}
            dx, grads = parallel.column_linear_backward(cache, dy[..., cols].copy(), grads)
        verdict.close("y", y, y_ref[..., cols], RTOL, ATOL)
        verdict.close("dx", dx, dx_ref[:, seq] if sp else dx_ref, RTOL, ATOL)
        verdict.close("dweight", grads["weight"], g_ref["weight"][:, cols], RTOL, ATOL)
        verdict.close("dbias", grads["bias"], g_ref["bias"][cols], RTOL, ATOL)
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_row_linear_matches_unsplit(tp_group, sp):
    world, verdict, group = tp_group
    dbias = np.full(C, np.nan)
    if group is not None:
        rng = np.random.default_rng(2)
        x, w, b = rng.normal(size=(B, T, 4 * C)), rng.normal(size=(4 * C, C)), rng.normal(size=C)
        dy = rng.normal(size=(B, T, C))
        y_ref, cache_ref = layers.linear_forward(w, b, x)
        dx_ref, g_ref = layers.linear_backward(cache_ref, dy)
        rows, seq = feature_slice(4 * C, group), sequence_slice(group)
        with verdict.guard("run"):
            y, cache = parallel.row_linear_forward(w[rows].copy(), b, x[..., rows].copy(),
                                                   group, sp)
            grads = {"weight": np.full((4 * C // group.size, C), np.nan),
                     "bias": np.full(C, np.nan)}
            dx, grads = parallel.row_linear_backward(cache, dy[:, seq].copy() if sp else dy,
                                                     grads)
            dbias = grads["bias"].copy()
            if sp:  # the caller's sum over the group
                group.all_reduce(grads["bias"])
        verdict.close("y", y, y_ref[:, seq] if sp else y_ref, RTOL, ATOL)
        verdict.close("dx", dx, dx_ref[..., rows], RTOL, ATOL)
        verdict.close("dweight", grads["weight"], g_ref["weight"][rows], RTOL, ATOL)
        verdict.close("dbias summed", grads["bias"], g_ref["bias"], RTOL, ATOL)
        if sp:
            verdict.close("dbias of this rank's positions", dbias, dy[:, seq].sum((0, 1)),
                          RTOL, ATOL)
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_vocab_embedding_matches_unsplit(tp_group, sp):
    world, verdict, group = tp_group
    if group is not None:
        rng = np.random.default_rng(3)
        padded, start, stop = parallel.vocab_shard(V, group.size, group.rank)
        wte = rng.normal(size=(padded, C))
        idx = rng.integers(0, V, size=(B, T))
        idx[0, :3] = V - 1  # repeated, and on the last rank
        dout = rng.normal(size=(B, T, C))
        before = rng.normal(size=(stop - start, C))
        y_ref, cache_ref = layers.embedding_forward(wte, np.zeros((T, C)), idx)
        _, g_ref = layers.embedding_backward(cache_ref, dout)
        seq = sequence_slice(group)
        with verdict.guard("run"):
            y, cache = parallel.vocab_embedding_forward(wte[start:stop].copy(), start, idx,
                                                        group, sp)
            dx, grads = parallel.vocab_embedding_backward(
                cache, dout[:, seq].copy() if sp else dout, {"wte": before.copy()})
        verdict.close("y", y, y_ref[:, seq] if sp else y_ref, RTOL, ATOL)
        verdict.close("dwte accumulated", grads["wte"], before + g_ref["wte"][start:stop],
                      RTOL, ATOL)
        with verdict.guard("dx"):
            assert dx is None
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("multiple", [1, 4])
def test_vocab_cross_entropy_matches_unsplit(tp_group, multiple):
    """vocab 11 padded to 12 (or 16: with tp=4 the last rank holds padding only)."""
    world, verdict, group = tp_group
    loss = np.nan
    if group is not None:
        rng = np.random.default_rng(4)
        padded, start, stop = parallel.vocab_shard(V, group.size, group.rank, multiple)
        N = B * T
        logits = rng.normal(size=(padded, N)) * 3
        logits[V:] = 50.0  # padding rows above every real logit: must not count
        targets = rng.integers(0, V, size=N)
        targets[:2] = [0, V - 1]
        loss_ref, cache_ref = layers.softmax_cross_entropy_forward(logits[:V].copy(), targets)
        dlogits_ref, _ = layers.softmax_cross_entropy_backward(cache_ref, 0.5)
        dlogits_ref = np.concatenate([dlogits_ref, np.zeros((padded - V, N))])
        with verdict.guard("run"):
            loss, cache = parallel.vocab_cross_entropy_forward(logits[start:stop].copy(),
                                                               targets, start, V, group)
            dlogits, _ = parallel.vocab_cross_entropy_backward(cache, 0.5)
        verdict.close("loss", loss, loss_ref, RTOL)
        verdict.close("dlogits", dlogits, dlogits_ref[start:stop], RTOL, ATOL)
        with verdict.guard("padding rows get exactly zero"):
            np.testing.assert_array_equal(dlogits[max(V - start, 0):], 0)
    losses = world.allgather(float(loss))
    if group is not None:
        with verdict.guard("the same loss, bit for bit, on every rank of the group"):
            first = world.Get_rank() - group.rank
            assert len(set(losses[first:first + group.size])) == 1, losses
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
def test_qkv_columns_give_each_rank_its_heads(tp_group):
    world, verdict, group = tp_group
    if group is not None:
        rng = np.random.default_rng(5)
        qkv = rng.normal(size=(B, T, 3 * C))
        dy = rng.normal(size=(B, T, C))
        y_ref, cache_ref = layers.attention_forward(qkv, H)
        dqkv_ref, _ = layers.attention_backward(cache_ref, dy)
        cols = parallel.qkv_columns(C, group.size, group.rank)
        heads = feature_slice(C, group)
        with verdict.guard("run"):
            y, cache = layers.attention_forward(qkv[..., cols], H // group.size)
            dqkv, _ = layers.attention_backward(cache, dy[..., heads].copy())
            y_all = group.all_gather(y, 2)
        verdict.close("local heads", y, y_ref[..., heads], RTOL, ATOL)
        verdict.close("all ranks' heads side by side", y_all, y_ref, RTOL, ATOL)
        verdict.close("dqkv", dqkv, dqkv_ref[..., cols], RTOL, ATOL)
    verdict.check(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("fused", [False, True], ids=["column-gelu", "column_linear_gelu"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_mlp_of_column_gelu_row_matches_unsplit(tp_group, sp, fused):
    """The layers composed as in a block: one sum forward, one backward (two under SP);
    GELU after the column-parallel linear, or inside it (the block's fused pair)."""
    world, verdict, group = tp_group
    if group is not None:
        rng = np.random.default_rng(6)
        x = rng.normal(size=(B, T, C))
        w1, b1 = rng.normal(size=(C, 4 * C)), rng.normal(size=4 * C)
        w2, b2 = rng.normal(size=(4 * C, C)), rng.normal(size=C)
        dy = rng.normal(size=(B, T, C))
        h, c1 = layers.linear_forward(w1, b1, x)
        a, c2 = layers.gelu_forward(h)
        y_ref, c3 = layers.linear_forward(w2, b2, a)
        da, g2 = layers.linear_backward(c3, dy)
        dh, _ = layers.gelu_backward(c2, da)
        dx_ref, g1 = layers.linear_backward(c1, dh)
        hidden, seq = feature_slice(4 * C, group), sequence_slice(group)
        x_in, dy_in = (x[:, seq].copy(), dy[:, seq].copy()) if sp else (x, dy)
        with verdict.guard("run"):
            group.reset_bytes()
            w1_local, b1_local = w1[:, hidden].copy(), b1[hidden].copy()
            if fused:
                a, c1 = parallel.column_linear_gelu_forward(w1_local, b1_local, x_in, group, sp)
            else:
                h, c1 = parallel.column_linear_forward(w1_local, b1_local, x_in, group, sp)
                a, c2 = layers.gelu_forward(h)
            y, c3 = parallel.row_linear_forward(w2[hidden].copy(), b2, a, group, sp)
            forward_bytes = group.reset_bytes()
            da, h2 = parallel.row_linear_backward(c3, dy_in)
            if fused:
                dx, h1 = parallel.column_linear_gelu_backward(c1, da)
            else:
                dh, _ = layers.gelu_backward(c2, da)
                dx, h1 = parallel.column_linear_backward(c1, dh)
            backward_bytes = group.reset_bytes()
        verdict.close("y", y, y_ref[:, seq] if sp else y_ref, RTOL, ATOL)
        verdict.close("dx", dx, dx_ref[:, seq] if sp else dx_ref, RTOL, ATOL)
        verdict.close("dw1", h1["weight"], g1["weight"][:, hidden], RTOL, ATOL)
        verdict.close("db1", h1["bias"], g1["bias"][hidden], RTOL, ATOL)
        verdict.close("dw2", h2["weight"], g2["weight"][hidden], RTOL, ATOL)
        with verdict.guard("bytes: SP sends what one all-reduce sends, each way"):
            p = group.size
            all_reduce = 2 * (p - 1) * B * T * C * 8 // p  # B*T*C divides by p here
            assert forward_bytes == backward_bytes == all_reduce
    verdict.check(world)
