"""Average precision: hand cases, and scikit-learn's definition on random data with ties and empty classes."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from metrics import average_precision, mean_average_precision


def sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Reference: scikit-learn per class, AP 0 for a class without positives (as the official code gets it)."""
    out = []
    for j in range(scores.shape[1]):
        out.append(average_precision_score(targets[:, j], scores[:, j]) if targets[:, j].any() else 0.0)
    return np.array(out)


def test_hand_computed_ap_without_ties():
    # ranked: +, -, +, -  -> precision at the positives: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    ap = average_precision(np.array([[0.9], [0.8], [0.7], [0.1]]), np.array([[1], [0], [1], [0]]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)


def test_hand_computed_ap_with_a_tie_forming_one_threshold():
    # 0.8 is shared by a negative and a positive: both enter together, precision there is 2/3 (not 2/2).
    ap = average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    assert ap == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_class_without_positives_counts_as_zero_in_the_mean():
    scores = np.array([[0.9, 0.3], [0.1, 0.2]])
    targets = np.array([[1, 0], [0, 0]])
    assert average_precision(scores, targets).tolist() == [1.0, 0.0]
    assert mean_average_precision(scores, targets) == pytest.approx(50.0)


@pytest.mark.parametrize("tied", [False, True])
def test_equals_sklearn_on_random_data(tied):
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, c = rng.integers(1, 60), rng.integers(1, 8)
        scores = rng.integers(0, 4, (n, c)) / 4 if tied else rng.random((n, c))
        targets = (rng.random((n, c)) < 0.3).astype(np.int64)
        targets[:, 0] = 0  # always one empty class
        np.testing.assert_allclose(average_precision(scores, targets), sklearn_ap(scores, targets), atol=1e-12)


def test_torch_input_gives_torch_output_and_the_same_values():
    rng = np.random.default_rng(1)
    scores, targets = rng.random((50, 6)).astype(np.float32), rng.random((50, 6)) < 0.2
    ap_t = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    assert isinstance(ap_t, torch.Tensor)
    np.testing.assert_allclose(ap_t.numpy(), sklearn_ap(scores, targets), atol=1e-12)


def test_valid_mask_leaves_entries_out():
    rng = np.random.default_rng(2)
    scores, targets = rng.random((80, 5)), rng.random((80, 5)) < 0.3
    valid = rng.random((80, 5)) < 0.6
    expected = [
        average_precision_score(targets[valid[:, j], j], scores[valid[:, j], j]) if targets[valid[:, j], j].any() else 0
        for j in range(5)
    ]
    np.testing.assert_allclose(average_precision(scores, targets, valid), expected, atol=1e-12)


def test_non_finite_scores_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([[np.nan], [0.1]]), np.array([[1], [0]]))
    with pytest.raises(ValueError, match="same N x C"):
        average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
