"""Average precision: hand cases, and scikit-learn's definition on random data with ties and empty classes."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from metrics import average_precision, mean_average_precision, report_metrics, threshold_metrics


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


# ---------------------------------------------------------------------------------------------------------------------
# Threshold metrics (CP, CR, CF1, OP, OR, OF1; and top-3).


def test_threshold_metrics_by_hand():
    # 3 images x 2 classes. Predicted at 0.5: class 0 -> images 0, 1 (TP 1 of 2 predicted; 1 of 2 positives);
    # class 1 -> image 2 (TP 1 of 1; 1 of 1 positives).
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.1], [0.3, 0.7]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 1]])
    m = threshold_metrics(scores, targets)
    cp, cr = (0.5 + 1.0) / 2, (0.5 + 1.0) / 2
    assert m["CP"] == pytest.approx(100 * cp) and m["CR"] == pytest.approx(100 * cr)
    assert m["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    # pooled: TP 2, predicted 3, positives 3
    assert m["OP"] == pytest.approx(100 * 2 / 3) and m["OR"] == pytest.approx(100 * 2 / 3)
    assert m["OF1"] == pytest.approx(100 * 2 / 3)


def test_top_k_keeps_only_the_k_highest_above_the_threshold():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    targets = torch.tensor([[0, 0, 1, 1]])
    top1 = threshold_metrics(scores, targets, top_k=1)  # predicts class 0 only: no TP
    assert top1["OP"] == 0.0 and top1["OR"] == 0.0
    top3 = threshold_metrics(scores, targets, top_k=3)  # classes 0, 1, 2: TP 1 of 3 predicted, 1 of 2 positives
    assert top3["OP"] == pytest.approx(100 / 3) and top3["OR"] == pytest.approx(50.0)
    low = threshold_metrics(torch.tensor([[0.4, 0.3, 0.2, 0.1]]), targets, top_k=3)  # top 3 but below 0.5
    assert low["OP"] == 0.0


def test_threshold_metrics_equal_scikit_learn_macro_and_micro():
    from sklearn.metrics import precision_score, recall_score

    rng = np.random.default_rng(0)
    scores = rng.random((200, 12))
    targets = (rng.random((200, 12)) < 0.2).astype(int)
    targets[:, 3] = 0  # a class without positives
    scores[:, 5] = 0.1  # a class never predicted
    predicted = (scores >= 0.5).astype(int)
    m = threshold_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    for name, average, fn in (("CP", "macro", precision_score), ("CR", "macro", recall_score),
                              ("OP", "micro", precision_score), ("OR", "micro", recall_score)):  # fmt: skip
        expected = 100 * fn(targets, predicted, average=average, zero_division=0)
        assert m[name] == pytest.approx(expected), name
    top = np.zeros_like(predicted)
    np.put_along_axis(top, np.argsort(-scores, axis=1)[:, :3], 1, axis=1)
    m3 = report_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    expected = 100 * precision_score(targets, top & predicted, average="micro", zero_division=0)
    assert m3["OP_top3"] == pytest.approx(expected) and m3["OP"] == pytest.approx(m["OP"])


def test_threshold_metrics_count_annotated_entries_only():
    scores = torch.tensor([[0.9, 0.9], [0.9, 0.1]])
    targets = torch.tensor([[1, 0], [0, 0]])
    valid = torch.tensor([[True, False], [False, True]])  # the false positive at (0, 1) is unknown: not counted
    m = threshold_metrics(scores, targets, valid)
    # class 0: predicted {0}, TP 1; class 1: predicted nothing, no positive -> precision 0, recall 0
    assert m["OP"] == 100.0 and m["OR"] == 100.0
    assert m["CP"] == pytest.approx(50.0)
    only_class0 = threshold_metrics(scores, targets, torch.tensor([[True, False], [True, False]]))
    assert only_class0["CP"] == 50.0  # class 1 has no valid entry: left out; class 0: TP 1 of 2 predicted
