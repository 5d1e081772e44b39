"""app/partition.py: balanced splits are optimal (against brute force), never drop a
layer, and move blocks off the stages that carry the embedding or a heavy head."""
import itertools

import numpy as np
import pytest

from app.parallel.partition import (balanced, check_split, format_partition, model_costs,
                                    stage_costs, uniform)
from models.gpt import GPTConfig


def brute_force(costs, p, first, last):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0,) + cuts + (n,)
        ranges = list(zip(bounds, bounds[1:]))
        worst = max(stage_costs(ranges, costs, first, last))
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        p = int(rng.integers(1, n + 1))
        costs = list(rng.uniform(0.1, 3.0, n))
        first, last = rng.uniform(0, 4, 2)
        ranges = balanced(costs, p, first, last)
        assert [b for _, b in ranges][-1] == n and ranges[0][0] == 0
        assert all(a < b for a, b in ranges)  # every stage gets a block
        assert all(r[1] == q[0] for r, q in zip(ranges, ranges[1:]))  # no gaps, no drops
        assert max(stage_costs(ranges, costs, first, last)) == pytest.approx(
            brute_force(costs, p, first, last))


def test_uniform_and_balanced_agree_on_equal_blocks_without_extras():
    assert uniform(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert uniform(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert balanced([1.0] * 8, 4) == uniform(8, 4)


def test_a_heavy_head_takes_blocks_off_the_last_stage():
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=64, vocab_size=50257)
    embedding, blocks, head = model_costs(cfg, tokens=768)
    assert head > blocks[0]  # a GPT-2 vocabulary outweighs a small block
    ranges = balanced(blocks, 4, embedding, head)
    sizes = [b - a for a, b in ranges]
    assert sizes[-1] < sizes[0] and sum(sizes) == 8
    costs = stage_costs(ranges, blocks, embedding, head)
    assert max(costs) < max(stage_costs(uniform(8, 4), blocks, embedding, head))
    assert format_partition(ranges, costs).startswith("stage 0: blocks 0-")


def test_splits_that_cannot_be_made_are_errors():
    with pytest.raises(ValueError, match=r"pp \* chunks = 5 \* 1 = 5 exceeds n_layer = 4"):
        uniform(4, 5)
    with pytest.raises(ValueError, match="exceeds n_layer = 3"):
        balanced([1.0] * 3, 4)
    with pytest.raises(ValueError, match=r"n_layer = 6 is not divisible by pp \* chunks = "
                                         r"2 \* 2"):
        check_split(6, 2, 2)
    check_split(8, 2, 2)
