"""The classification head's gradients against float64 central differences."""
import numpy as np
import pytest

from models import classifier
from tests.gradcheck import check_gradients

TOL = 1e-6
B, T, C, K = 4, 6, 5, 3
LENGTHS = np.array([6, 1, 3, 4])  # a full row, a one-token row and two padded ones


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def head_inputs(rng):
    return {"hidden": rng.normal(size=(B, T, C)), "weight": rng.normal(size=(C, K)),
            "bias": rng.normal(size=K)}


@pytest.mark.parametrize("pool", classifier.POOLS)
def test_every_gradient_matches_finite_differences(rng, pool):
    inputs = head_inputs(rng)
    labels = np.array([0, 2, 1, 2])

    def forward():
        return classifier.classifier_forward(inputs["weight"], inputs["bias"],
                                             inputs["hidden"], LENGTHS, labels, pool)

    def backward(cache, dloss):
        dhidden, grads = classifier.classifier_backward(cache, dloss)
        return {"hidden": dhidden, **grads}

    check_gradients(forward, backward, inputs, rng, TOL, max_samples=B * T * C)


@pytest.mark.parametrize("pool", classifier.POOLS)
def test_padding_gets_no_gradient_and_changes_nothing(rng, pool):
    inputs = head_inputs(rng)
    labels = np.array([1, 0, 2, 1])
    loss, cache = classifier.classifier_forward(inputs["weight"], inputs["bias"],
                                                inputs["hidden"], LENGTHS, labels, pool)
    dhidden, _ = classifier.classifier_backward(cache)
    positions = np.arange(T)[None, :]
    padded = positions >= LENGTHS[:, None]
    assert np.all(dhidden[padded] == 0)
    read = ~padded if pool == "mean" else positions == LENGTHS[:, None] - 1
    np.testing.assert_array_equal(np.abs(dhidden).sum(-1) > 0, read)
    noisy = inputs["hidden"].copy()
    noisy[padded] = 1e6
    loss_noisy, _ = classifier.classifier_forward(inputs["weight"], inputs["bias"], noisy,
                                                  LENGTHS, labels, pool)
    assert loss_noisy == loss


def test_pools_read_the_right_positions(rng):
    hidden = rng.normal(size=(B, T, C))
    last, _ = classifier.pool_forward(hidden, LENGTHS, "last")
    mean, _ = classifier.pool_forward(hidden, LENGTHS, "mean")
    for row, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(last[row], hidden[row, n - 1])
        np.testing.assert_allclose(mean[row], hidden[row, :n].mean(0), rtol=1e-14)


def test_loss_is_the_mean_cross_entropy(rng):
    inputs = head_inputs(rng)
    labels = np.array([2, 2, 0, 1])
    loss, _ = classifier.classifier_forward(inputs["weight"], inputs["bias"],
                                            inputs["hidden"], LENGTHS, labels, "last")
    logits, _ = classifier.logits_forward(inputs["weight"], inputs["bias"], inputs["hidden"],
                                          LENGTHS, "last")
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss == pytest.approx(-log_probs[np.arange(B), labels].mean(), rel=1e-12)


def test_backward_fills_preallocated_gradients(rng):
    inputs = head_inputs(rng)
    labels = np.array([0, 1, 2, 0])
    _, cache = classifier.classifier_forward(inputs["weight"], inputs["bias"],
                                             inputs["hidden"], LENGTHS, labels, "mean")
    grads = {"weight": np.full((C, K), np.nan), "bias": np.full(K, np.nan)}
    _, returned = classifier.classifier_backward(cache, 1.0, grads)
    assert returned is grads and np.isfinite(grads["weight"]).all()
    assert np.isfinite(grads["bias"]).all()


def test_unknown_pool(rng):
    with pytest.raises(ValueError, match="'max'"):
        classifier.pool_forward(rng.normal(size=(B, T, C)), LENGTHS, "max")
