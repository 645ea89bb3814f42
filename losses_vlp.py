"""Vision-language pseudo-labels (VLPL and AEVLP) as pure functions of tensors.

A frozen CLIP scores every training image against one text prompt per class (``pseudo_labels.py`` does that once per
dataset and scorer and caches the raw cosine similarities). Here, from those similarities:

- the pseudo-label rules: VLPL's (Xing et al., CVPR Workshops 2024, arXiv 2310.15985; github.com/mvrl/VLPL) and
  AEVLP's DAMP (Tran et al., ICCV 2025, arXiv 2508.20381; github.com/Fsoft-AIC/AEVLP), each a function of the
  similarities and the observed labels only: neither looks at the model being trained, so they are computed once per
  image and flip, before training;
- the two losses: VLPL's "EM_PL" (EM on the unknown labels, a smoothed BCE on the positive pseudo-labels) and
  AEVLP's "GPR" loss (GR Loss plus weighted BCE terms on the pseudo-labels and EPR's regulariser).

Pseudo-labels are int8: 1 (positive), -1 (negative), 0 (none). An observed label always wins over a pseudo-label.
The maths follows the authors' released code (VLPL: losses.py ``loss_EM_PL``, models.py; AEVLP: losses.py
``GPR_loss``, utils.py ``get_pseudo_labels``); docs/vlp.md says where this implementation differs and why. This file
was written from a reading of that code, not copied from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import losses

# VLPL's positive pseudo-labels are trained towards 0.9, not 1 (their loss_EM_PL: 0.9 * -log p + 0.1 * -log(1 - p));
# the commented-out negative term used the mirror image (0.1, 0.9).
VLPL_SMOOTHING = 0.9


def clip_probabilities(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(similarity / temperature) over the classes (the last dimension), in fp32: both papers' "T-softmax"."""
    return F.softmax(similarity.float() / temperature, dim=-1)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` lowest scores along the last dimension (none when ``count`` is 0)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(-1, scores.topk(min(count, scores.shape[-1]), dim=-1, largest=False).indices, True)
    return mask


def vlpl_pseudo_labels(
    similarity: torch.Tensor, *, temperature: float, threshold: float, negative_fraction: float
) -> torch.Tensor:
    """VLPL's pseudo-labels from the whole image's similarities (... x C): 1 where the temperature softmax over the
    classes exceeds ``threshold``; -1 on the ``int(negative_fraction * C)`` lowest (their ``partial``; they overwrite
    a positive, as the released code's scatter does); 0 elsewhere."""
    probs = clip_probabilities(similarity, temperature)
    labels = (probs > threshold).to(torch.int8)
    negatives = _lowest(probs, int(negative_fraction * probs.shape[-1]))
    return labels.masked_fill(negatives, -1)


def aevlp_pseudo_labels(
    similarity: torch.Tensor,
    observed: torch.Tensor,
    *,
    temperature: float,
    threshold: float,
    top_k: int,
    eta: float,
    negative_ratio: float,
) -> torch.Tensor:
    """AEVLP's DAMP pseudo-labels. ``similarity`` is ... x V x C: view 0 the whole image, views 1.. the crops of the
    grid; ``observed`` is ... x C.

    With g the whole image's temperature softmax and c_v each crop's:
    - the gate: per class, the max over crops where it exceeds eta' = min(g at the observed positive, ``eta``), else
      the min over crops (the "max/min" aggregation);
    - score = (g + gated) / 2; among each image's ``top_k`` highest scores, those >= ``threshold`` are positives;
    - the ``int(negative_ratio * C)`` lowest of (g + mean over crops) / 2 are negatives (they overwrite a positive).
    """
    if similarity.shape[-2] < 2:
        raise ValueError("AEVLP needs the whole image and at least one crop (a score file made with --grid >= 1)")
    probs = clip_probabilities(similarity, temperature)
    whole, crops = probs[..., 0, :], probs[..., 1:, :]
    highest, lowest, mean = crops.amax(-2), crops.amin(-2), crops.mean(-2)
    at_positive = torch.where(observed == 1, whole, 0.0).amax(-1, keepdim=True)
    gate = highest > at_positive.clamp(max=eta)
    score = (whole + torch.where(gate, highest, lowest)) / 2
    top = score.topk(min(top_k, score.shape[-1]), dim=-1)
    labels = torch.zeros_like(score, dtype=torch.int8).scatter(
        -1, top.indices, (top.values >= threshold).to(torch.int8)
    )
    negatives = _lowest((whole + mean) / 2, int(negative_ratio * score.shape[-1]))
    return labels.masked_fill(negatives, -1)


def vlpl_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    pseudo: torch.Tensor | None,
    *,
    alpha: float,
    beta_pos: float,
    beta_neg: float,
    reduce: losses.Reduce | None = None,
) -> torch.Tensor:
    """VLPL's batch loss (their ``loss_EM_PL``), the mean over all B*C entries:

    - observed positive: -log p; observed negative (-1): -log(1 - p);
    - unobserved with a positive pseudo-label: beta_pos * (0.9 * -log p + 0.1 * -log(1 - p));
    - unobserved with a negative pseudo-label: beta_neg * (0.1 * -log p + 0.9 * -log(1 - p)) (commented out in the
      released code, where beta_neg is 0: the default 0 gives its zero);
    - other unobserved entries: -alpha * H(p), EM's entropy term.

    ``pseudo`` None is the warm-up: plain EM. ``-log(x + 1e-5)`` as Cole et al.'s code, which VLPL's builds on.
    """
    if pseudo is None:
        return losses.em_loss(logits, observed, alpha, reduce=reduce)
    p = torch.sigmoid(logits.float())
    neg_log = losses._neg_log
    entropy = p * neg_log(p) + (1 - p) * neg_log(1 - p)
    towards_positive = beta_pos * (VLPL_SMOOTHING * neg_log(p) + (1 - VLPL_SMOOTHING) * neg_log(1 - p))
    towards_negative = beta_neg * ((1 - VLPL_SMOOTHING) * neg_log(p) + VLPL_SMOOTHING * neg_log(1 - p))
    unobserved = torch.where(
        pseudo == 1, towards_positive, torch.where(pseudo == -1, towards_negative, -alpha * entropy)
    )
    matrix = torch.where(observed == 0, unobserved, losses._positive_and_negative_terms(p, observed))
    return losses._reduce(matrix, reduce)


def aevlp_loss_matrix(
    logits: torch.Tensor,
    observed: torch.Tensor,
    pseudo: torch.Tensor,
    *,
    w: float,
    b: float,
    mu: float,
    sigma: float,
    q2: float,
    q3: float,
    lambda1: float,
    lambda2: float,
    rho: float,
) -> torch.Tensor:
    """AEVLP's GPR loss per entry (B x C, fp32) for one epoch's GR values (w, b, mu, sigma):

    - observed entries and unobserved ones without a pseudo-label: GR Loss (``losses.gr_loss_matrix``);
    - unobserved, positive pseudo-label: (1 - v') * (rho * -log p + (1 - rho) * -log(1 - p)), where
      v' = v(p) clamped to [1 - lambda1, 1 - lambda2];
    - unobserved, negative pseudo-label: v(p) * -log(1 - p).

    v(p) is GR's weight, from p detached; -log(x + 1e-7) as GR Loss.
    """
    matrix = losses.gr_loss_matrix(logits, observed, w=w, b=b, mu=mu, sigma=sigma, q2=q2, q3=q3)
    p = torch.sigmoid(logits.float())
    v = losses.gr_weight(p.detach(), mu, sigma)
    v_positive = v.clamp(min=1 - lambda1, max=1 - lambda2)
    neg_log_p, neg_log_not_p = -torch.log(p + losses.GR_LOG_EPSILON), -torch.log(1 - p + losses.GR_LOG_EPSILON)
    positive = (1 - v_positive) * (rho * neg_log_p + (1 - rho) * neg_log_not_p)
    negative = v * neg_log_not_p
    unobserved = observed == 0
    matrix = torch.where(unobserved & (pseudo == 1), positive, matrix)
    return torch.where(unobserved & (pseudo == -1), negative, matrix)


def aevlp_problems(*, lambda1: float, lambda2: float, rho: float, reg: float) -> list[str]:
    """What is wrong with AEVLP's own constants, one sentence per problem."""
    problems = []
    if not 0 <= lambda2 <= lambda1 <= 1:
        problems.append(
            f"AEVLP's lambdas must satisfy 0 <= lambda2 <= lambda1 <= 1: v is clamped to "
            f"[1 - lambda1, 1 - lambda2] (got {lambda1}, {lambda2})"
        )
    if not 0 <= rho <= 1:
        problems.append(f"AEVLP's rho mixes two targets and must lie in [0, 1] (got {rho})")
    if reg < 0:
        problems.append(f"AEVLP's regulariser weight must be >= 0 (got {reg})")
    return problems


def aevlp_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    pseudo: torch.Tensor,
    *,
    epoch: int,
    num_epochs: int,
    w: tuple[float, float],
    b: tuple[float, float],
    mu: tuple[float, float],
    sigma: tuple[float, float],
    q2: float,
    q3: float,
    lambda1: float,
    lambda2: float,
    rho: float,
    reg: float,
    expected_num_pos: float,
    reduce: losses.Reduce | None = None,
) -> torch.Tensor:
    """AEVLP's batch loss at ``epoch`` (1-indexed) of ``num_epochs``: the mean of ``aevlp_loss_matrix`` over all B*C
    entries (GR's schedule for w, b, mu, sigma) plus ``reg`` times EPR's regulariser
    (mean predicted positives - expected_num_pos)^2 / C^2, as their ``GPR_loss``. No host synchronisation."""
    now = losses.gr_schedule(epoch, num_epochs, w=w, b=b, mu=mu, sigma=sigma)
    matrix = aevlp_loss_matrix(
        logits,
        observed,
        pseudo,
        w=now.w,
        b=now.b,
        mu=now.mu,
        sigma=now.sigma,
        q2=q2,
        q3=q3,
        lambda1=lambda1,
        lambda2=lambda2,
        rho=rho,
    )
    p = torch.sigmoid(logits.float())
    return losses._reduce(matrix, reduce) + reg * losses.expected_positive_regularizer(p, expected_num_pos)
