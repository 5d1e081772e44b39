"""Two baselines for a classification file of `prepare --task classify` (app/classify_data.py),
against which a fine-tuned GPT is judged (`make sentiment`, bench/sentiment.py):

- the majority class: every row gets the most frequent label of the train split;
- byte-bigram multinomial naive Bayes, in NumPy: a row's features are the counts of its
  adjacent token pairs over its real tokens (padding excluded), indexed into 65,536 bins
  (exactly one bin per pair for the 256-id byte tokenizer, hashed by a modulus for larger
  vocabularies); the class-conditional bin probabilities are Laplace-smoothed counts of the
  train split, and a row's class is the argmax of log prior + sum of its bigrams' log
  probabilities.

Both return predicted label ids; `score` gives accuracy and macro-F1 from the same
confusion-matrix code that `app finetune` logs (app/classify.py), so the numbers compare.
"""
import numpy as np

from app.classify import scores
from app.classify_data import SplitRows

BINS = 2 ** 16  # one bin per byte pair: 256 x 256


def majority_class(train: SplitRows, n_classes: int) -> int:
    """The most frequent label id of `train` (the lowest id on a tie)."""
    return int(np.bincount(train.labels, minlength=n_classes).argmax())


def predict_majority(train: SplitRows, rows: SplitRows, n_classes: int) -> np.ndarray:
    return np.full(len(rows.labels), majority_class(train, n_classes), dtype=np.int64)


def bigram_bins(rows: SplitRows, vocab_size: int):
    """(row index, bin) of every adjacent pair of real tokens, as two flat arrays."""
    tokens = rows.tokens.astype(np.int64)
    # pair j is (token j, token j+1); it is real when token j+1 is: j + 1 < length
    real = np.arange(tokens.shape[1] - 1)[None, :] + 1 < rows.lengths[:, None]
    row_index = np.broadcast_to(np.arange(len(tokens))[:, None], real.shape)[real]
    bins = (tokens[:, :-1] * vocab_size + tokens[:, 1:])[real] % BINS
    return row_index, bins


class BigramNaiveBayes:
    """Multinomial naive Bayes on byte-bigram counts, Laplace smoothing `alpha`."""

    def __init__(self, n_classes: int, vocab_size: int, alpha: float = 1.0):
        self.n_classes, self.vocab_size, self.alpha = n_classes, vocab_size, alpha
        self.log_prior = self.log_prob = None

    def fit(self, train: SplitRows) -> "BigramNaiveBayes":
        K = self.n_classes
        row_index, bins = bigram_bins(train, self.vocab_size)
        counts = np.bincount(train.labels[row_index] * BINS + bins,
                             minlength=K * BINS).reshape(K, BINS).astype(np.float64)
        smoothed = counts + self.alpha
        self.log_prob = np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))
        # a class absent from train keeps prior 0 (log -inf): it is never predicted
        with np.errstate(divide="ignore"):
            self.log_prior = np.log(np.bincount(train.labels, minlength=K) / len(train.labels))
        return self

    def log_joint(self, rows: SplitRows) -> np.ndarray:
        """(N, K): log prior + the log-likelihood of each row's bigrams, per class."""
        row_index, bins = bigram_bins(rows, self.vocab_size)
        n = len(rows.labels)
        likelihood = np.stack([np.bincount(row_index, weights=self.log_prob[k, bins],
                                           minlength=n) for k in range(self.n_classes)], axis=1)
        return likelihood + self.log_prior

    def predict(self, rows: SplitRows) -> np.ndarray:
        return self.log_joint(rows).argmax(axis=1)


def predict_naive_bayes(train: SplitRows, rows: SplitRows, n_classes: int, vocab_size: int,
                        alpha: float = 1.0) -> np.ndarray:
    return BigramNaiveBayes(n_classes, vocab_size, alpha).fit(train).predict(rows)


def score(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> dict:
    """{accuracy, macro_f1} of `predictions` against `labels` (app/classify.py's scores)."""
    totals = np.zeros(n_classes * n_classes + 1)  # confusion matrix, then a loss we lack
    np.add.at(totals, np.asarray(labels) * n_classes + np.asarray(predictions), 1.0)
    found = scores(totals, n_classes)
    return {"accuracy": float(found["accuracy"]), "macro_f1": found["macro_f1"]}


def accuracy(labels, predictions, n_classes: int) -> float:
    return score(labels, predictions, n_classes)["accuracy"]


def macro_f1(labels, predictions, n_classes: int) -> float:
    return score(labels, predictions, n_classes)["macro_f1"]


def baseline_scores(data, split: str = "test") -> dict:
    """{name: {accuracy, macro_f1}} of both baselines, fitted on train, on `split` of a
    `ClassifyData`."""
    train, rows, K = data.split("train"), data.split(split), len(data.labels)
    return {"majority class": score(rows.labels, predict_majority(train, rows, K), K),
            "byte-bigram naive Bayes": score(
                rows.labels, predict_naive_bayes(train, rows, K, data.vocab_size), K)}
