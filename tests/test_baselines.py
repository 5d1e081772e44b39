"""app/baselines.py: the majority class and byte-bigram naive Bayes on synthetic rows."""
import numpy as np
import pytest

from app.baselines import (BINS, accuracy, bigram_bins, macro_f1, predict_majority,
                           predict_naive_bayes)
from app.classify_data import SplitRows


def rows_of(texts, labels, max_len=24):
    """SplitRows of byte texts, cut or padded (id 0) to max_len, as `prepare` writes them."""
    tokens = np.zeros((len(texts), max_len), dtype=np.uint8)
    lengths = np.array([min(len(t), max_len) for t in texts], dtype=np.int32)
    for i, text in enumerate(texts):
        tokens[i, :lengths[i]] = np.frombuffer(text[:max_len], dtype=np.uint8)
    return SplitRows(tokens, lengths, np.asarray(labels, dtype=np.int32))


def xy_rows(n, seed):
    """Random letters; label 1 exactly when the bigram "xy" appears. Every letter, x and y
    included, occurs in both classes, so only the pair tells them apart."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        letters = rng.choice(np.frombuffer(b"abcdefxy", np.uint8), rng.integers(4, 10)).tobytes()
        letters = letters.replace(b"xy", b"yx")  # no accidental pair in class 0
        if i % 2:
            at = rng.integers(0, len(letters) - 1)
            letters = letters[:at] + b"xy" + letters[at + 2:]
        texts.append(letters)
        labels.append(int(b"xy" in letters))
    return rows_of(texts, labels)


def test_bigram_bins_count_real_pairs_only():
    rows = rows_of([b"abc", b"a"], [0, 1], max_len=5)
    row_index, bins = bigram_bins(rows, 256)
    assert row_index.tolist() == [0, 0]  # "ab", "bc"; padding and a 1-token row give none
    assert bins.tolist() == [ord("a") * 256 + ord("b"), ord("b") * 256 + ord("c")]
    assert (bigram_bins(rows, 300)[1] < BINS).all()  # a larger vocabulary is hashed


def test_naive_bayes_learns_the_xy_pair():
    train, test = xy_rows(2000, seed=0), xy_rows(400, seed=1)
    assert 0.4 < test.labels.mean() < 0.6
    predictions = predict_naive_bayes(train, test, 2, 256)
    assert accuracy(test.labels, predictions, 2) > 0.9  # chance is 0.5


def test_majority_predicts_the_train_majority():
    train = rows_of([b"aa"] * 5, [2, 2, 0, 2, 1])
    test = rows_of([b"bb"] * 4, [0, 1, 2, 2])
    assert predict_majority(train, test, 3).tolist() == [2, 2, 2, 2]
    assert accuracy(test.labels, predict_majority(train, test, 3), 3) == 0.5


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2])
    # class 0: P 1, R 2/3 -> F1 0.8; class 1: P 1/2, R 1/2 -> 0.5; class 2: P 1/2, R 1 -> 2/3
    assert macro_f1(labels, predictions, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class that neither occurs nor is predicted does not count (scikit-learn's way)
    assert macro_f1(np.array([0, 1]), np.array([0, 1]), 3) == pytest.approx(1.0)
    assert accuracy(labels, predictions, 3) == pytest.approx(4 / 6)
