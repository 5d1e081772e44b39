"""The whole model: gradients against finite differences, GPT-2 names, shapes and init."""
import numpy as np
import pytest

from models import gpt
from tests.gradcheck import model_gradient_errors

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)


def test_whole_model_gradients_match_finite_differences():
    """Every parameter tensor, up to 12 sampled elements each, in float64. The parameters are
    nudged off the symmetric init so that every gradient is well above round-off."""
    rng = np.random.default_rng(1)
    params = gpt.init_params(CFG, seed=0, dtype=np.float64)
    params.flat += rng.normal(0.0, 0.2, params.size)
    idx = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    targets = rng.integers(0, CFG.vocab_size, (3, CFG.block_size))
    errors = model_gradient_errors(params, CFG, idx, targets, rng, max_samples=12)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-6, f"{worst}: {errors[worst]:.2e}"
    assert len(errors) == len(gpt.param_shapes(CFG))


def test_gpt2_names_and_shapes():
    shapes = gpt.param_shapes(gpt.GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                            vocab_size=50257))
    assert shapes["wte"] == (50257, 768) and shapes["wpe"] == (1024, 768)
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304)
    assert shapes["h.0.mlp.c_proj.weight"] == (3072, 768)
    assert shapes["ln_f.bias"] == (768,)
    # GPT-2 small without the tied head: 124,439,808 parameters
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808
    assert len(shapes) == 2 + 12 * 12 + 2


def test_init_statistics():
    cfg = gpt.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256)
    p = gpt.init_params(cfg, seed=0)
    assert p.flat.dtype == np.float32
    assert p["wte"].std() == pytest.approx(0.02, rel=0.05)
    assert p["h.0.attn.c_attn.weight"].std() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / np.sqrt(2 * cfg.n_layer)
    assert p["h.3.attn.c_proj.weight"].std() == pytest.approx(residual, rel=0.05)
    assert p["h.3.mlp.c_proj.weight"].std() == pytest.approx(residual, rel=0.05)
    assert np.all(p["h.1.ln_2.weight"] == 1) and np.all(p["h.1.mlp.c_fc.bias"] == 0)
    again = gpt.init_params(cfg, seed=0, dtype=np.float64)
    np.testing.assert_allclose(again.flat, p.flat, rtol=1e-6)  # same numbers in any dtype


def test_flat_views_share_one_buffer():
    p = gpt.init_params(CFG, seed=0)
    p["h.1.ln_1.bias"][...] = 7.0
    start = p.offsets["h.1.ln_1.bias"]
    assert np.all(p.flat[start:start + CFG.n_embd] == 7.0)
    assert p.size == gpt.num_params(CFG) == p.flat.size


def test_head_is_tied_to_embedding():
    """wte's gradient is the head's plus the embedding's share: zeroing either path changes it."""
    rng = np.random.default_rng(3)
    p = gpt.init_params(CFG, seed=0, dtype=np.float64)
    idx = rng.integers(0, CFG.vocab_size, (2, CFG.block_size))
    tgt = rng.integers(0, CFG.vocab_size, (2, CFG.block_size))
    _, cache = gpt.forward(p, CFG, idx, tgt)
    grads = gpt.backward(cache, p.like())
    _, cache = gpt.forward(p, CFG, idx, tgt)
    head_only = p.like()
    gpt.head_backward(head_only, cache[2])
    embedding_rows = np.unique(idx)
    assert not np.allclose(grads["wte"][embedding_rows], head_only["wte"][embedding_rows])
    unused = np.setdiff1d(np.arange(CFG.vocab_size), embedding_rows)
    np.testing.assert_allclose(grads["wte"][unused], head_only["wte"][unused])


def test_sequence_longer_than_block_size_is_rejected():
    p = gpt.init_params(CFG, seed=0)
    idx = np.zeros((1, CFG.block_size + 1), dtype=np.int64)
    with pytest.raises(ValueError, match="block_size"):
        gpt.forward(p, CFG, idx, idx)


def test_backward_announces_every_gradient_once_when_final():
    """on_ready(names) fires after the last write to each gradient: wte only at the end."""
    rng = np.random.default_rng(4)
    p = gpt.init_params(CFG, seed=0, dtype=np.float64)
    idx = rng.integers(0, CFG.vocab_size, (2, CFG.block_size))
    _, cache = gpt.forward(p, CFG, idx, idx)
    grads = p.like()
    snapshots = {}

    def on_ready(names):
        for name in names:
            assert name not in snapshots
            snapshots[name] = grads[name].copy()

    gpt.backward(cache, grads, on_ready=on_ready)
    assert list(snapshots)[-2:] == ["wte", "wpe"] and list(snapshots)[:2] == ["ln_f.weight",
                                                                              "ln_f.bias"]
    assert set(snapshots) == set(gpt.param_shapes(CFG))
    for name, value in snapshots.items():
        np.testing.assert_array_equal(value, grads[name], err_msg=name)


def test_stages_chained_equal_the_whole_model():
    """Cutting the model into chunks (embedding first, head last) changes no number, and
    the two shares of the tied wte gradient add up to the whole model's."""
    rng = np.random.default_rng(6)
    cfg = gpt.GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    p = gpt.init_params(cfg, seed=0, dtype=np.float64)
    idx = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
    tgt = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
    mask = gpt.layers.causal_mask(np, cfg.block_size, np.float64)
    whole_loss, cache = gpt.forward(p, cfg, idx, tgt)
    whole = gpt.backward(cache, p.like())
    specs = [gpt.StageSpec(0, 1, True, False), gpt.StageSpec(1, 3, False, True)]
    assert gpt.stage_param_names(cfg, specs[:1]) == ["wte", "wpe"] + list(gpt.block_param_names(0))
    assert gpt.stage_param_names(cfg, specs[1:])[0] == "wte"
    grads = [p.like(), p.like()]
    act, c0 = gpt.stage_forward(p, cfg, specs[0], idx, None, mask)
    loss, c1 = gpt.stage_forward(p, cfg, specs[1], act, tgt, mask)
    assert loss == whole_loss
    d_act = gpt.stage_backward(specs[1], c1, grads[1], 1.0)
    assert gpt.stage_backward(specs[0], c0, grads[0], d_act) is None
    for name in gpt.param_shapes(cfg):
        owners = [g[name] for g, spec in zip(grads, specs)
                  if name in gpt.stage_param_names(cfg, [spec])]
        np.testing.assert_allclose(sum(owners), whole[name], rtol=1e-12, err_msg=name)
