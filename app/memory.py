"""Will the config fit? A lower-bound estimate of one rank's memory, checked before anything
is allocated or written, so that `--block-size 20000` is one line instead of a MemoryError
after the run directory was made.

The estimate counts what must exist at the peak, not allocator slack or temporaries, so it
refuses only configs that certainly cannot fit:

- parameters, gradients, the accumulation buffer and AdamW's two moments (sharded under
  ZeRO-1), plus a whole-model copy where a pipeline gathers the stages for validation;
- the activations a forward pass caches for backward, per block of `rows` sequences of
  T tokens of width C with H heads (see models/gpt.py `block_forward`):
  16·rows·T·C elements (the two LayerNorms' normalised inputs and outputs, q, k and v,
  the attention output, the MLP's 4C-wide input and GELU output: what
  app/parallel/interpreter.py `cache_bytes` finds in a block's cache) plus the causal half
  of the attention scores,
  rows·H·T·(T+64)/2, plus the head's probabilities, V·rows·T; tensor parallelism splits
  all but the column-parallel linears' inputs and (without sequence parallelism) the
  LayerNorm caches;
- less with `recompute`: `selective` keeps no scores, `full` only each block's input;
- held for as many micro-batches as the schedule keeps alive (1 without a pipeline, up to
  pp for 1F1B, all of them for GPipe), and for a validation batch of batch_size rows.
"""

from app.errors import UserError
from app.parallel.precision import master_dtype_of


def estimate_bytes(cfg, dp: int) -> int:
    """Lower bound of the peak bytes one rank needs for `cfg` on a dp x pp x tp grid."""
    from models.gpt import num_params
    itemsize = master_dtype_of(cfg.dtype).itemsize
    n_params = num_params(cfg.model_config())
    stage_params = n_params / (cfg.pp * cfg.tp)  # tensor parallelism splits (nearly) all
    moments = 2 * stage_params / (dp if cfg.zero else 1)
    buffers = stage_params * (2 + (cfg.micro_batches > 1)) + moments
    if cfg.pp > 1:
        buffers += n_params  # the gathered whole model, for validation and saving
    rows = cfg.batch_size // (dp * cfg.micro_batches)
    alive = 1 if cfg.pp == 1 else (cfg.micro_batches if cfg.schedule == "gpipe"
                                   else min(cfg.micro_batches, cfg.pp * cfg.chunks))
    train = alive * activation_elements(cfg, rows, cfg.n_layer / cfg.pp, cfg.recompute,
                                        cfg.tp, cfg.sequence_parallel)
    validation = activation_elements(cfg, cfg.batch_size, cfg.n_layer)
    return int((buffers + max(train, validation)) * itemsize)


# Of a block's 16 cached rows·T·C, the column-parallel linears' two inputs stay whole on
# every tensor-parallel rank (we cache them gathered rather than all-gather them again in
# backward), and so do the two LayerNorm caches unless sequence parallelism splits them.
BLOCK_WIDTHS = 16
GATHERED_LINEAR_INPUTS = 2
LAYERNORM_CACHES = 2


def activation_elements(cfg, rows, n_blocks, recompute="none", tp=1, sequence_parallel=False):
    """Elements one rank caches in a forward of `rows` sequences through `n_blocks` blocks
    and the head, with the blocks' and the vocabulary's tensor-parallel split over `tp`.
    cfg: anything with block_size, n_embd, n_head and vocab_size (a TrainConfig, a
    GPTConfig)."""
    T, C, H = cfg.block_size, cfg.n_embd, cfg.n_head
    token_widths = rows * T * C
    if recompute == "full":  # only each block's input is kept
        per_block = token_widths / (tp if sequence_parallel else 1)
    else:
        whole = GATHERED_LINEAR_INPUTS + (0 if sequence_parallel else LAYERNORM_CACHES)
        per_block = whole * token_widths + (BLOCK_WIDTHS - whole) * token_widths / tp
        if recompute == "none":  # the causal half of the scores, heads split over tp
            per_block += rows * H * T * (T + 64) / 2 / tp
    return n_blocks * per_block + cfg.vocab_size * rows * T / tp


def available_bytes():
    """Memory this process may still take: MemAvailable, capped by a cgroup v2 limit (as
    under Slurm or a container); None where neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            if limit != "max":
                limits.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def check_fits(cfg, dp: int, ranks_on_node: int):
    """UserError if `ranks_on_node` ranks of `cfg` cannot fit in this node's free memory."""
    if cfg.device != "cpu":
        return  # device memory is the GPU path's to check
    need = estimate_bytes(cfg, dp) * ranks_on_node
    free = available_bytes()
    if free is not None and need > free:
        per_rank = f" ({ranks_on_node} ranks here)" if ranks_on_node > 1 else ""
        raise UserError(f"config needs at least {_gib(need)} of memory{per_rank} but "
                        f"{_gib(free)} is available: expected a smaller batch_size, "
                        f"block_size (now {cfg.block_size}) or model, or more nodes")


def _gib(n):
    return f"{n / 2**30:.1f} GiB"
