"""AdamW, the schedule and clipping against straightforward per-tensor reference code."""
import math

import numpy as np
import pytest

from models import gpt
from models.optim import AdamW, clip_by_global_norm, decay_mask, global_norm, lr_at


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd, decay):
    """The textbook update (Loshchilov & Hutter, as in torch.optim.AdamW), one tensor."""
    if decay:
        p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def test_adamw_matches_reference_with_decay_only_on_matrices():
    cfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    params.flat += 0.1  # biases non-zero, so decaying them would show
    ref = {n: (params[n].copy(), np.zeros_like(params[n]), np.zeros_like(params[n]))
           for n in params}
    opt = AdamW(params.flat, decay_mask(params, gpt.is_decayed), 0.9, 0.95, 1e-8, 0.1)
    rng = np.random.default_rng(0)
    for t in range(1, 6):
        grads = params.like()
        grads.flat[:] = rng.normal(size=params.size)
        lr = 0.01 * t
        opt.step(grads.flat, lr)
        for n in params:
            p, m, v = ref[n]
            ref[n] = reference_adamw(p, grads[n], m, v, t, lr, 0.9, 0.95, 1e-8, 0.1,
                                     gpt.is_decayed(n))
    for n in params:
        np.testing.assert_allclose(params[n], ref[n][0], rtol=1e-12, atol=1e-14, err_msg=n)


def test_decayed_names():
    assert gpt.is_decayed("wte") and gpt.is_decayed("h.0.attn.c_attn.weight")
    for name in ("h.0.attn.c_attn.bias", "h.3.ln_1.weight", "ln_f.weight", "ln_f.bias"):
        assert not gpt.is_decayed(name)


def test_schedule_warmup_then_cosine():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, 1.0, 0.1, 0, 100) == pytest.approx(1.0)  # no warm-up


def test_clip_by_global_norm():
    g = np.array([3.0, 4.0, 0.0, 12.0])  # norm 13
    assert global_norm(g) == pytest.approx(13.0)
    before = clip_by_global_norm(g, 1.0)
    assert before == pytest.approx(13.0)
    assert global_norm(g) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(g / g[1], [0.75, 1.0, 0.0, 3.0])
    small = np.array([0.3, 0.4])
    clip_by_global_norm(small, 1.0)
    np.testing.assert_array_equal(small, [0.3, 0.4])
    big = np.array([30.0, 40.0])
    clip_by_global_norm(big, 0.0)  # 0 = off
    np.testing.assert_array_equal(big, [30.0, 40.0])
    assert math.isclose(global_norm(np.zeros(3)), 0.0)


def test_adamw_on_owned_ranges_matches_the_full_update_there():
    """ZeRO-1: ranks owning disjoint ranges together compute exactly the full update."""
    cfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    full = gpt.init_params(cfg, seed=0, dtype=np.float64)
    mask = decay_mask(full, gpt.is_decayed)
    shards = [[(0, 37), (100, 250)], [(37, 100)], [(250, full.size)]]
    copies = [full.flat.copy() for _ in shards]
    opt_full = AdamW(full.flat, mask, weight_decay=0.1)
    opts = [AdamW(c, mask, weight_decay=0.1, ranges=r) for c, r in zip(copies, shards)]
    rng = np.random.default_rng(5)
    for _ in range(3):
        g = rng.normal(size=full.size)
        opt_full.step(g, 0.01)
        for opt in opts:
            opt.step(g, 0.01)
    assert sum(o.m.size for o in opts) == full.size  # moments sharded, not replicated
    for copy, ranges in zip(copies, shards):
        for a, b in ranges:
            np.testing.assert_array_equal(copy[a:b], full.flat[a:b])


def _steps(flat, mask, grads, **options):
    """Three AdamW steps on a copy of `flat`; returns the copy."""
    params = flat.copy()
    opt = AdamW(params, mask, weight_decay=0.1, **options)
    for g in grads:
        opt.step(g, 0.01)
    return params


def test_lr_scale_of_one_changes_nothing():
    cfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    full = gpt.init_params(cfg, seed=0, dtype=np.float64)
    mask = decay_mask(full, gpt.is_decayed)
    grads = np.random.default_rng(1).normal(size=(3, full.size))
    np.testing.assert_array_equal(_steps(full.flat, mask, grads, lr_scales=[(40, 300, 1.0)]),
                                  _steps(full.flat, mask, grads))


def test_lr_scale_applies_to_its_range_only_decay_included():
    """A scaled range steps (and decays) as if the learning rate were lr * factor; the
    rest as with lr. The range cuts through decayed and undecayed tensors."""
    cfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10,
                        n_classes=3)
    full = gpt.init_params(cfg, seed=0, dtype=np.float64)
    full.flat += 0.1
    mask = decay_mask(full, gpt.is_decayed)
    a, b = 130, full.size - 5  # up to the middle of cls.bias
    grads = np.random.default_rng(2).normal(size=(3, full.size))
    scaled = _steps(full.flat, mask, grads, lr_scales=[(a, b, 7.0)])
    ref = {}
    for factor in (1.0, 7.0):
        params = full.flat.copy()
        opt = AdamW(params, mask, weight_decay=0.1)
        for g in grads:
            opt.step(g, 0.01 * factor)
        ref[factor] = params
    np.testing.assert_allclose(scaled[a:b], ref[7.0][a:b], rtol=1e-13)
    np.testing.assert_array_equal(scaled[:a], ref[1.0][:a])
    np.testing.assert_array_equal(scaled[b:], ref[1.0][b:])
    assert not np.allclose(scaled[a:b], ref[1.0][a:b])


def test_lr_scales_on_owned_ranges_match_the_full_update():
    """ZeRO-1: shards cut through a scaled range; together they make the full update."""
    cfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10,
                        n_classes=2)
    full = gpt.init_params(cfg, seed=0, dtype=np.float64)
    mask = decay_mask(full, gpt.is_decayed)
    scales = [(full.offsets["cls.weight"], full.size, 10.0), (3, 20, 0.5)]
    shards = [[(0, 10), (full.size - 12, full.size)], [(10, full.size - 12)]]
    grads = np.random.default_rng(3).normal(size=(3, full.size))
    expected = _steps(full.flat, mask, grads, lr_scales=scales)
    for ranges in shards:
        got = _steps(full.flat, mask, grads, lr_scales=scales, ranges=ranges)
        for a, b in ranges:
            np.testing.assert_array_equal(got[a:b], expected[a:b])
