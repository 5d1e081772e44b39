"""`python -m app eval`: validation loss and perplexity of a finished run, on one process."""
import math

import numpy as np

from app.data import TokenData, validation_batches
from app.errors import UserError
from app.generate import load_run
from comm import ring
from models import gpt


def validation_loss(params, model_cfg, batches) -> tuple[float, int]:
    """(mean next-token cross-entropy over every token of the batches, windows seen); each
    batch weighted by its rows, as the trainer's validation does, so the two agree."""
    total, rows = 0.0, 0
    for x, y in batches:
        loss, _ = gpt.forward(params, model_cfg, x, y)
        total += float(loss) * len(x)
        rows += len(x)
    return total / rows, rows


def shared_validation_loss(params, model_cfg, batches, xp, dp_comm) -> float:
    """The trainer's validation: the same mean as `validation_loss`, with the batches shared
    out over the data-parallel ranks (each weighted by its rows)."""
    rank, size = dp_comm.Get_rank(), dp_comm.Get_size()
    totals = np.zeros(2)
    for x, y in batches[rank::size]:
        loss, _ = gpt.forward(params, model_cfg, xp.asarray(x), xp.asarray(y))
        totals += (float(loss) * len(x), len(x))
    ring.all_reduce(dp_comm, totals)
    return totals[0] / totals[1]


def add_arguments(parser):
    parser.description = (f"{parser.description}: the mean next-token loss over the fixed "
                          "validation windows the trainer uses, from the val split of the "
                          "data file; NumPy on the CPU, no mpirun needed")
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="run directory written by `app train`")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="a checkpoint of the run (RUN/checkpoints/step_N), saved in any "
                             "layout (default: the run's final params.h5)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="token file from `app prepare` (default: the data of the run's "
                             "config.toml)")
    parser.add_argument("--windows", type=int, default=None, metavar="N",
                        help="validation windows of block_size tokens (default: the run's "
                             "eval_windows; at most as many as fit the val split without "
                             "overlap)")


def run(args):
    if args.windows is not None and args.windows < 1:
        raise UserError(f"--windows {args.windows}: expected an integer > 0")
    cfg, params, attrs = load_run(args.run, args.checkpoint)
    path = args.data or cfg.data
    with TokenData(path) as data:
        trained_with = str(attrs.get("tokenizer", "bytes"))
        if data.tokenizer != trained_with:
            raise UserError(f"data file {path} uses tokenizer {data.tokenizer!r} but run "
                            f"{args.run} was trained with {trained_with!r}: expected a file "
                            "prepared with the run's tokenizer")
        batches = validation_batches(data, cfg.block_size, cfg.batch_size,
                                     args.windows or cfg.eval_windows)
        with np.errstate(all="ignore"):  # an overflow shows as an inf loss, said below
            loss, windows = validation_loss(params, cfg.model_config(), batches)
    print(f"val loss {loss:.6f} | perplexity {math.exp(min(loss, 700.0)):.4f} | {windows} "
          f"windows of {cfg.block_size} tokens ({windows * cfg.block_size:,} tokens) from "
          f"{path}")
    return 0
