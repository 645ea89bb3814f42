"""Average precision and mAP, vectorised over classes, with scikit-learn's exact definition (tied scores included).

AP of one class = sum over distinct score thresholds t (descending) of (R(t) - R(t_prev)) * P(t): the step-wise area
under the precision-recall curve, where all entries with the same score enter together (one threshold). This equals
``sklearn.metrics.average_precision_score`` per class. A class without positives gets AP 0 and still counts in the mean
(as in the official code, which calls scikit-learn). Everything runs in torch, on whatever device the scores are on.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Ascending sort of each row. On the CPU numpy's vectorised sort is about twice as fast as torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _ap_dense(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # AP = mean over the positives j of  #{positives with score >= s_j} / #{entries with score >= s_j}:
    # counting ">=" puts every tied entry into one threshold, exactly as scikit-learn does. Only the positives need
    # a rank, so one sort of each class's scores and two searchsorted calls replace the whole precision-recall curve.
    # Work class-major (C x N, contiguous): every step below runs along rows.
    positive = (targets if targets.dtype == torch.bool else targets > 0).t().contiguous()
    scores = (scores if scores.dtype == torch.float64 else scores.float()).t().contiguous()
    num_classes, n = scores.shape
    rows, cols = positive.nonzero(as_tuple=True)  # row-major: grouped by class
    num_pos = torch.bincount(rows, minlength=num_classes)
    width = max(int(num_pos.max()), 1)
    slot = torch.arange(rows.numel(), device=scores.device) - (num_pos.cumsum(0) - num_pos)[rows]
    pos_scores = torch.full((num_classes, width), -torch.inf, dtype=scores.dtype, device=scores.device)
    pos_scores[rows, slot] = scores[rows, cols]
    pos_scores = _sort_rows(pos_scores)  # -inf padding first, then the positives ascending
    ranked_at_or_above = n - torch.searchsorted(_sort_rows(scores), pos_scores, side="left")
    positives_at_or_above = width - torch.searchsorted(pos_scores, pos_scores, side="left")
    real = torch.arange(width, device=scores.device) >= (width - num_pos).unsqueeze(1)
    precision = positives_at_or_above.double() / ranked_at_or_above.clamp(min=1).double()
    ap = torch.where(real, precision, 0.0).sum(1) / num_pos.clamp(min=1).double()
    return torch.where(num_pos > 0, ap, 0.0)


def average_precision_entries(scores, positive, classes, num_classes: int) -> torch.Tensor:
    """Per-class AP from a list of scored entries: ``scores[i]`` of class ``classes[i]``, a positive or not.

    The form for partially annotated labels (OpenImages): only annotated entries are listed, so unknown ones never
    enter a class's ranking. A class with entries but no positive gets 0; a class with no entry gets NaN (skipped by
    ``mean_average_precision``). Same tie rule as ``average_precision``.
    """
    scores, positive, classes = _as_tensor(scores), _as_tensor(positive), _as_tensor(classes)
    device = scores.device
    positive, classes = positive.to(device).bool(), classes.to(device).long()
    scores = scores if scores.dtype == torch.float64 else scores.float()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(classes[order], stable=True)]  # by class, scores descending within a class
    scores, positive, classes = scores[order], positive[order], classes[order]
    m = len(scores)
    is_group_end = torch.ones(m, dtype=torch.bool, device=device)
    is_group_end[:-1] = (scores[1:] != scores[:-1]) | (classes[1:] != classes[:-1])
    positions = torch.arange(m, device=device)
    group_end = torch.where(is_group_end, positions, m).flip(0).cummin(0).values.flip(0)
    counts = torch.bincount(classes, minlength=num_classes)
    starts = counts.cumsum(0) - counts
    true_pos = positive.long().cumsum(0)
    before_start = torch.where(starts > 0, true_pos[(starts - 1).clamp(min=0)], 0) if m else starts
    ranked_at_or_above = group_end - starts[classes] + 1
    positives_at_or_above = true_pos[group_end] - before_start[classes]
    precision = positives_at_or_above.double() / ranked_at_or_above.double()
    num_pos = torch.bincount(classes, weights=positive.double(), minlength=num_classes)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device).index_add_(0, classes, precision * positive)
    ap = torch.where(num_pos > 0, total / num_pos.clamp(min=1), 0.0)
    return torch.where(counts > 0, ap, torch.nan)


def average_precision(scores, targets, valid=None):
    """Per-class AP of an N x C score matrix against 0/1 targets (numpy in, numpy out; torch in, torch out).

    ``valid`` (optional, N x C bool) leaves entries out entirely, as if their rows did not exist for that class: the
    OpenImages protocol, where unknown labels are not scored (a class with no valid entry gets NaN). Scores must be
    finite.
    """
    is_numpy = not isinstance(scores, torch.Tensor)
    scores_t = _as_tensor(scores)
    targets_t = _as_tensor(targets).to(scores_t.device)
    valid_t = None if valid is None else _as_tensor(valid).to(scores_t.device).bool()
    one_class = scores_t.dim() == 1
    if one_class:
        scores_t, targets_t = scores_t[:, None], targets_t[:, None]
        valid_t = None if valid_t is None else valid_t[:, None]
    if scores_t.dim() != 2 or scores_t.shape != targets_t.shape:
        raise ValueError(f"scores {tuple(scores_t.shape)} and targets {tuple(targets_t.shape)} must be the same N x C")
    if valid_t is not None and valid_t.shape != scores_t.shape:
        raise ValueError(f"valid {tuple(valid_t.shape)} must match scores {tuple(scores_t.shape)}")
    if not bool(torch.isfinite(scores_t).all()):
        raise ValueError("scores contain NaN or infinite values")
    if valid_t is not None:
        rows, cols = valid_t.nonzero(as_tuple=True)
        ap = average_precision_entries(scores_t[rows, cols], targets_t[rows, cols] > 0, cols, scores_t.shape[1])
    elif scores_t.shape[0] == 0:
        ap = torch.zeros(scores_t.shape[1], dtype=torch.float64, device=scores_t.device)
    else:
        ap = _ap_dense(scores_t, targets_t)
    if one_class:
        ap = ap[0]
    return ap.cpu().numpy() if is_numpy else ap


def mean_average_precision(scores, targets, valid=None) -> float:
    """mAP in percent: 100 x the mean of ``average_precision`` over classes (classes without positives count as 0;
    with ``valid``, classes without any valid entry are skipped)."""
    ap = _as_tensor(average_precision(scores, targets, valid))
    return 100.0 * float(ap.nanmean())


# ---------------------------------------------------------------------------------------------------------------------
# Threshold metrics: what multi-label papers report beside mAP.

THRESHOLD_METRICS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def threshold_metrics(scores, targets, valid=None, *, threshold: float = 0.5, top_k: int | None = None) -> dict:
    """CP, CR, CF1, OP, OR, OF1 in percent, with the literature's definitions (e.g. ML-GCN, Chen et al. CVPR 2019).

    An entry is predicted positive when its score is at least ``threshold``; with ``top_k``, only among the ``top_k``
    highest scores of its image (ML-GCN's top-3 rule: top k *and* above the threshold). Per class c: precision
    TP_c / predicted_c, recall TP_c / positives_c, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``).
    CP and CR are their means over the classes, CF1 = 2 CP CR / (CP + CR); OP, OR and OF1 pool every entry.
    ``valid`` (N x C bool, optional) scores annotated entries only (OpenImages: unknown labels count neither as
    predictions nor as positives), and classes without a valid entry are left out of CP and CR.
    """
    scores, targets = _as_tensor(scores), _as_tensor(targets)
    targets = targets.to(scores.device) > 0
    predicted = scores >= threshold
    if top_k is not None:
        k = min(top_k, scores.shape[1])
        in_top = torch.zeros_like(predicted).scatter_(1, scores.topk(k, dim=1).indices, True)
        predicted &= in_top
    if valid is not None:
        valid = _as_tensor(valid).to(scores.device).bool()
        predicted, targets = predicted & valid, targets & valid
    true_pos = (predicted & targets).sum(0).double()
    num_predicted, num_positive = predicted.sum(0).double(), targets.sum(0).double()
    counted = valid.any(0) if valid is not None else torch.ones_like(true_pos, dtype=torch.bool)
    precision = torch.where(num_predicted > 0, true_pos / num_predicted.clamp(min=1), 0.0)
    recall = torch.where(num_positive > 0, true_pos / num_positive.clamp(min=1), 0.0)
    cp, cr = float(precision[counted].mean()), float(recall[counted].mean())
    tp, pred, pos = float(true_pos.sum()), float(num_predicted.sum()), float(num_positive.sum())
    op, o_r = (tp / pred if pred else 0.0), (tp / pos if pos else 0.0)

    def f1(p: float, r: float) -> float:
        return 2 * p * r / (p + r) if p + r else 0.0

    values = (cp, cr, f1(cp, cr), op, o_r, f1(op, o_r))
    return {name: 100.0 * v for name, v in zip(THRESHOLD_METRICS, values, strict=True)}


def report_metrics(scores, targets, valid=None, *, threshold: float = 0.5, top_k: int = 3) -> dict:
    """The threshold metrics at ``threshold`` and the same for the top ``top_k`` predictions (keys ``CP_top3``, ...),
    as ``final.json`` stores them."""
    out = threshold_metrics(scores, targets, valid, threshold=threshold)
    top = threshold_metrics(scores, targets, valid, threshold=threshold, top_k=top_k)
    out.update({f"{name}_top{top_k}": value for name, value in top.items()})
    return out
