"""`python -m app classify`: the label a fine-tuned run gives a text, on one process; and
the scores of a classifier (loss, accuracy, macro-F1) that `app finetune` logs.

Scores come from a confusion matrix of counts, so data-parallel ranks each count their
share of the rows and one all-reduce of the counts gives every rank the same numbers.
Macro-F1 is the mean F1 over the classes that occur, as truths or predictions (as
scikit-learn's `f1_score(average="macro")` does without `labels`).
"""
import json
import sys
from pathlib import Path

import numpy as np

from app.errors import UserError
from app.generate import load_run
from app.tokenizer import get_tokenizer
from comm import ring, watchdog
from comm.backend import to_host
from models import gpt

BEST = "best.h5"  # the parameters of the best validation accuracy of a fine-tune run


def count_predictions(params, model_cfg: gpt.GPTConfig, batches, xp) -> np.ndarray:
    """(K*K + 1,) float64: the confusion matrix (true class, predicted class) of every row
    of `batches` ((ids, lengths, labels) each), flattened, then the summed cross-entropy."""
    K = model_cfg.n_classes
    totals = np.zeros(K * K + 1)
    for ids, lengths, labels in batches:
        logits = to_host(gpt.logits(params, model_cfg, xp.asarray(ids), xp.asarray(lengths)))
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        totals[-1] -= log_probs[np.arange(len(labels)), labels].sum()
        np.add.at(totals, labels * K + logits.argmax(axis=1), 1.0)
    return totals


def scores(totals: np.ndarray, n_classes: int) -> dict:
    """{loss, accuracy, macro_f1, rows} of `count_predictions`' totals."""
    confusion = totals[:-1].reshape(n_classes, n_classes)
    rows = confusion.sum()
    hits = np.diag(confusion)
    occurring = 2 * hits + (confusion.sum(axis=0) - hits) + (confusion.sum(axis=1) - hits)
    f1 = 2 * hits[occurring > 0] / occurring[occurring > 0]
    return {"loss": totals[-1] / rows, "accuracy": hits.sum() / rows,
            "macro_f1": float(f1.mean()), "rows": int(rows)}


def shared_scores(params, model_cfg, batches, xp, dp_comm) -> dict:
    """`scores` of all `batches`, each data-parallel rank counting every dp-th one."""
    rank, size = dp_comm.Get_rank(), dp_comm.Get_size()
    totals = count_predictions(params, model_cfg, batches[rank::size], xp)
    with watchdog.waiting("the other ranks' prediction counts"):
        ring.all_reduce(dp_comm, totals)
    return scores(totals, model_cfg.n_classes)


def add_arguments(parser):
    parser.description = (f"{parser.description}: the label, and its probability, that the "
                          f"best checkpoint ({BEST}) of a fine-tune run gives a text")
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="run directory written by `app finetune`")
    parser.add_argument("--text", required=True, help="the text to classify")


def run(args):
    if not (Path(args.run) / BEST).is_file():
        raise UserError(f"run directory {args.run}: missing {BEST}: expected a run written by "
                        "`app finetune`")
    cfg, params, attrs = load_run(args.run, params_name=BEST, classifier=True)
    labels = json.loads(attrs["labels"])
    ids = get_tokenizer(str(attrs["tokenizer"])).encode(args.text)
    if len(ids) == 0:
        raise UserError("--text is empty: expected at least one character")
    max_len = int(attrs["max_len"])
    if len(ids) > max_len:  # as `prepare --task classify` cut the rows it was tuned on
        print(f"note: the text has {len(ids)} tokens; its first {max_len} (the fine-tune "
              "data's max_len) are classified", file=sys.stderr)
        ids = ids[:max_len]
    logits = gpt.logits(params, cfg.model_config(), np.asarray([ids], dtype=np.int64),
                        np.asarray([len(ids)]))[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(probs.argmax())
    print(f"{labels[best]} {probs[best]:.4f}")
    return 0
