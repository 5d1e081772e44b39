"""Which transformer blocks each pipeline stage owns.

Stage s owns a contiguous range of blocks; the first stage also runs the embedding, the
last the final norm, the LM head and the loss. `uniform` splits the blocks evenly;
`balanced` chooses the boundaries that minimise the slowest stage's cost, counting the
embedding and the head, whose cost grows with the vocabulary. Costs come from a FLOP
model (`model_costs`) or from timings measured on real steps. No layer is ever dropped:
every stage gets at least one block, and a split that cannot be made is an error.
"""
from functools import lru_cache

from models.gpt import GPTConfig

# Bytes moved per FLOP-equivalent: elementwise work (embedding gather, softmax, norms) is
# bound by memory traffic, not arithmetic. About a tenth of a FLOP/s budget per byte/s.
FLOPS_PER_BYTE = 10.0


def model_costs(cfg: GPTConfig, tokens: int):
    """(embedding, [block] * n_layer, head) training costs in FLOP-equivalents for a
    micro-batch of `tokens` tokens: 3x the forward (backward is twice the forward)."""
    C, T, V = cfg.n_embd, cfg.block_size, cfg.vocab_size
    block = 3 * tokens * (2 * 12 * C * C + 2 * T * C)  # weight GEMMs + causal attention
    block += 3 * tokens * FLOPS_PER_BYTE * 4 * 30 * C  # ~30 elementwise passes over (T, C)
    embedding = 3 * tokens * FLOPS_PER_BYTE * 4 * 3 * C  # gather, add, scatter-add
    head = 3 * tokens * (2 * C * V + FLOPS_PER_BYTE * 4 * 5 * V)  # logits GEMM + softmax
    return embedding, [block] * cfg.n_layer, head


def check_split(n_layer: int, n_stages: int, n_chunks: int = 1):
    """Raises ValueError (naming the numbers) when the blocks cannot be split so."""
    if n_stages * n_chunks > n_layer:
        raise ValueError(f"pp * chunks = {n_stages} * {n_chunks} = {n_stages * n_chunks} "
                         f"exceeds n_layer = {n_layer}: expected at least one block per "
                         "(virtual) stage")
    if n_chunks > 1 and n_layer % (n_stages * n_chunks):
        raise ValueError(f"n_layer = {n_layer} is not divisible by pp * chunks = "
                         f"{n_stages} * {n_chunks}: interleaving needs equal chunks")


def uniform(n_layer: int, n_stages: int):
    """[(start, stop)] block ranges, as even as possible (earlier stages one longer)."""
    check_split(n_layer, n_stages)
    q, extra = divmod(n_layer, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        stop = start + q + (s < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def balanced(block_costs, n_stages: int, first_extra=0.0, last_extra=0.0):
    """[(start, stop)] block ranges minimising the largest stage cost, where the first
    stage also pays `first_extra` (embedding) and the last `last_extra` (head and loss).
    Exact, by dynamic programming over split points. Among splits with the same largest
    cost, the smallest sum of squared stage costs wins: when one stage (a big head)
    dominates, the others still share the remaining blocks evenly."""
    costs = list(block_costs)
    n = len(costs)
    check_split(n, n_stages)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(s, start, stop):
        return (prefix[stop] - prefix[start] + (first_extra if s == 0 else 0.0)
                + (last_extra if s == n_stages - 1 else 0.0))

    @lru_cache(maxsize=None)
    def best(s, start):
        """(max cost, sum of squares, ranges) for stages s.. covering blocks start.. ."""
        if s == n_stages - 1:
            cost = stage_cost(s, start, n)
            return cost, cost * cost, ((start, n),)
        options = []
        for stop in range(start + 1, n - (n_stages - s - 1) + 1):  # leave a block per stage
            rest_max, rest_squares, rest = best(s + 1, stop)
            cost = stage_cost(s, start, stop)
            options.append((max(cost, rest_max), cost * cost + rest_squares,
                            ((start, stop),) + rest))
        return min(options, key=lambda option: option[:2])

    return list(best(0, 0)[2])


def stage_costs(ranges, block_costs, first_extra=0.0, last_extra=0.0):
    """The cost of each stage under `ranges` (for printing a partition)."""
    out = [sum(block_costs[a:b]) for a, b in ranges]
    out[0] += first_extra
    out[-1] += last_extra
    return out


def format_partition(ranges, costs) -> str:
    worst = max(costs)
    return "; ".join(f"stage {s}: blocks {a}-{b - 1} ({100 * c / worst:.0f}%)"
                     for s, ((a, b), c) in enumerate(zip(ranges, costs)))
