"""models/sharding.py: every tensor-parallel rank's share of every GPT parameter, and the
pieces that put the shares back into the logical tensor exactly once."""
import numpy as np
import pytest

from app.parallel.state import unshard
from models import gpt, sharding

CFG = gpt.GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=8, vocab_size=11)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_cover_every_logical_element_once_and_round_trip(tp):
    full = gpt.init_params(CFG, seed=0, dtype=np.float64)
    for name, shape in gpt.param_shapes(CFG).items():
        shares = [sharding.shard(name, full[name], CFG, tp, r) for r in range(tp)]
        assert all(s.shape == sharding.local_shape(name, shape, CFG, tp) for s in shares)
        np.testing.assert_array_equal(unshard(name, shares, CFG, tp), full[name], err_msg=name)
        placed = sharding.tp_pieces(name, CFG, tp, 0)
        if placed is None:
            continue
        hits = np.zeros(shape, int)
        for r in range(tp):
            axis, pieces = sharding.tp_pieces(name, CFG, tp, r)
            for _, start, length in pieces:
                index = [slice(None)] * len(shape)
                index[axis] = slice(start, start + length)
                hits[tuple(index)] += 1
        assert np.all(hits == 1), name


def test_padded_vocabulary_rows_are_zero_and_split_evenly():
    assert sharding.padded_vocab(CFG, 4) == 12 and sharding.padded_vocab(CFG, 1) == 11
    wte = gpt.init_params(CFG, seed=0, dtype=np.float64)["wte"]
    last = sharding.shard("wte", wte, CFG, 4, 3)
    assert last.shape == (3, CFG.n_embd)
    np.testing.assert_array_equal(last[2], 0)  # row 11 is padding
    np.testing.assert_array_equal(last[:2], wte[9:11])


def test_attention_columns_are_whole_heads_of_q_k_and_v():
    C, tp = CFG.n_embd, 2
    axis, pieces = sharding.tp_pieces("h.0.attn.c_attn.weight", CFG, tp, 1)
    assert axis == 1 and pieces == [(0, 8, 8), (8, 24, 8), (16, 40, 8)]  # q, k, v of heads 2-3
    assert sharding.tp_pieces("h.0.attn.c_proj.weight", CFG, tp, 1) == (0, [(0, 8, 8)])
    assert sharding.tp_pieces("h.0.mlp.c_fc.bias", CFG, tp, 1) == (0, [(0, 32, 32)])
    assert sharding.tp_pieces("h.0.ln_1.weight", CFG, tp, 1) is None
    assert sharding.local_shape("h.1.mlp.c_proj.weight", (4 * C, C), CFG, tp) == (2 * C, C)
