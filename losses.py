"""Large-loss rejection and correction (Kim et al., CVPR 2022, Sec. 3.2) as pure functions of tensors.

Usable on its own from any training loop::

    rate = modification_rate("LL-R", epoch, delta_rel=0.4)
    loss, selected = large_loss(logits, observed, "LL-R", rate)

``observed`` holds 1 (observed positive), -1 (observed negative) and 0 (unobserved). The naive "assume negative"
(AN) loss treats every unobserved entry as a negative; the large-loss schemes then reject (LL-R) or correct (LL-Ct,
LL-Cp) the unobserved entries whose AN loss is among the largest of the batch, because those are likely false
negatives that the model would otherwise memorise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Scheme(NamedTuple):
    """What a large-loss scheme does with the k unobserved entries of largest loss: ``treat`` them as "reject" (loss
    0), "correct" (BCE against 1) or None (select nothing: plain AN); and whether its rate ``grows`` with the epoch
    (LL-R, LL-Ct) or stays at delta_rel per epoch (LL-Cp, whose corrections accumulate in the label matrix)."""

    treat: str | None
    grows: bool


# The paper's four schemes by name. A new scheme passes its own ``Scheme`` to the functions below instead of a name.
SCHEMES: dict[str, Scheme] = {
    "AN": Scheme(None, grows=False),
    "LL-R": Scheme("reject", grows=True),
    "LL-Ct": Scheme("correct", grows=True),
    "LL-Cp": Scheme("correct", grows=False),
}
_TREATMENTS = (None, "reject", "correct")


def _check_scheme(scheme: str | Scheme) -> Scheme:
    """The scheme's behaviour, from its name or as given."""
    if isinstance(scheme, Scheme):
        if scheme.treat not in _TREATMENTS:
            raise ValueError(
                f"a Scheme treats the selected entries as 'reject', 'correct' or None, not {scheme.treat!r}"
            )
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {tuple(SCHEMES)} or pass a losses.Scheme")
    return SCHEMES[scheme]


def modification_rate(scheme: str | Scheme, epoch: int, delta_rel: float) -> float:
    """Fraction of a batch's B*C label entries to reject or correct at ``epoch`` (1-indexed).

    ``delta_rel`` is in percent per epoch, as on the official command line. LL-R and LL-Ct grow the rate linearly,
    (epoch - 1) * delta_rel / 100 (the paper's Delta_rel schedule); LL-Cp corrects a constant delta_rel / 100 per
    epoch because its corrections accumulate in the label matrix. Epoch 1 is never modified: the model first has to
    learn the clean patterns before large losses mean anything. The rate is a fraction of the batch, so it never
    exceeds 1.0: a schedule that would pass 1 (a large ``delta_rel``, or many epochs) stays at 1.0, i.e. every
    unobserved entry is modified; below 1 the values are exactly the formula's.
    """
    behaviour = _check_scheme(scheme)
    if epoch < 1:
        raise ValueError(f"epoch is 1-indexed, got {epoch}")
    if delta_rel < 0:
        raise ValueError(f"delta_rel must be >= 0, got {delta_rel}")
    if behaviour.treat is None or epoch == 1:
        return 0.0
    if not behaviour.grows:
        return min(1.0, delta_rel / 100)
    return min(1.0, (epoch - 1) * delta_rel / 100)


def num_to_select(batch_size: int, num_classes: int, rate: float) -> int:
    """k = ceil(B * C * rate). Rounded to 9 decimals first so float noise (1280 * 0.005 = 6.000000000000001) does
    not add an entry."""
    return max(0, math.ceil(round(batch_size * num_classes * rate, 9)))


def select_largest(loss_matrix: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` candidate entries with the largest loss (every candidate if there are fewer).

    Non-candidates are never selected, whatever ``k`` is. Costs no host synchronisation.
    """
    if k <= 0:
        return torch.zeros_like(candidates, dtype=torch.bool)
    flat = loss_matrix.detach().float().masked_fill(~candidates, -math.inf).flatten()
    top = torch.topk(flat, min(k, flat.numel()))
    picked = torch.zeros_like(flat, dtype=torch.bool)
    # When k exceeds the candidates, topk also returns -inf entries: they are not candidates and stay unselected.
    picked[top.indices] = top.values > -math.inf
    return picked.view_as(candidates)


Reduce = Callable[[torch.Tensor], torch.Tensor]
Select = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def large_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    scheme: str | Scheme,
    rate: float,
    *,
    select: Select | None = None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch loss and the B x C mask of the unobserved entries it rejected or corrected.

    loss = mean over all B*C entries of l, where l = BCE(z, max(y, 0)) elementwise (AN), except on the
    k = ceil(B*C*rate) unobserved entries with the largest l: there l = 0 for LL-R (rejection) and l = BCE(z, 1) for
    LL-Ct and LL-Cp (temporary correction; LL-Cp's permanent update of the label matrix is the caller's job, using the
    returned mask). ``scheme="AN"`` is plain BCE and selects nothing. Computed in fp32 whatever the logits' dtype.

    When a batch is split over several processes, the trainer passes ``select(loss_matrix, candidates)`` (the
    selection made over the whole batch, gathered across processes) and ``reduce(loss_matrix)`` (this process's
    share of the batch mean); by default both work on this batch alone.
    """
    treat = _check_scheme(scheme).treat
    if logits.dim() != 2 or logits.shape != observed.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and observed {tuple(observed.shape)} must be the same B x C")
    logits = logits.float()
    loss_matrix = F.binary_cross_entropy_with_logits(logits, observed.clamp(min=0).float(), reduction="none")
    if treat is None:
        selected = torch.zeros_like(observed, dtype=torch.bool)
    elif select is not None:
        selected = select(loss_matrix.detach(), observed == 0)
    else:
        selected = select_largest(loss_matrix, observed == 0, num_to_select(logits.shape[0], logits.shape[1], rate))
    if treat == "reject":
        loss_matrix = loss_matrix.masked_fill(selected, 0.0)
    elif treat == "correct":
        corrected = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
        loss_matrix = torch.where(selected, corrected, loss_matrix)
    return _reduce(loss_matrix, reduce), selected


def _reduce(loss_matrix: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    return loss_matrix.mean() if reduce is None else reduce(loss_matrix)


# ---------------------------------------------------------------------------------------------------------------------
# Baselines on the same protocol as LL (the paper's comparison table). Written, as in Cole et al. (CVPR 2021) and
# Zhou et al. (ECCV 2022), with sigmoid probabilities and -log(p + 1e-5), and averaged over all B*C entries
# (``reduce``: as in ``large_loss``). Observed negatives (-1, OpenImages) are plain negatives in every loss;
# single-positive data has none. EPR's and ROLE's regularisers need the whole batch: the trainer runs them in one
# process only.

LOG_EPSILON = 1e-5


def _neg_log(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(x + LOG_EPSILON)


def _positive_and_negative_terms(p: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """-log p on observed positives, -log(1 - p) on observed negatives, 0 elsewhere."""
    return torch.where(observed == 1, _neg_log(p), torch.where(observed == -1, _neg_log(1 - p), 0.0))


def expected_positive_regularizer(p: torch.Tensor, expected_num_pos: float) -> torch.Tensor:
    """EPR's penalty: (mean over the batch of the predicted number of positives - expected number)^2 / C^2."""
    return (p.sum(1).mean(0) - expected_num_pos) ** 2 / p.shape[1] ** 2


def wan_loss(logits: torch.Tensor, observed: torch.Tensor, *, reduce: Reduce | None = None) -> torch.Tensor:
    """Weak AN: unobserved entries count as negatives with weight 1 / (C - 1)."""
    p = torch.sigmoid(logits.float())
    unobserved = _neg_log(1 - p) / (p.shape[1] - 1)
    return _reduce(torch.where(observed == 0, unobserved, _positive_and_negative_terms(p, observed)), reduce)


def lsan_loss(
    logits: torch.Tensor, observed: torch.Tensor, ls_coef: float = 0.1, *, reduce: Reduce | None = None
) -> torch.Tensor:
    """AN with label smoothing: targets 1 - ls_coef for positives and ls_coef for every other entry."""
    p = torch.sigmoid(logits.float())
    as_positive = (1 - ls_coef) * _neg_log(p) + ls_coef * _neg_log(1 - p)
    as_negative = (1 - ls_coef) * _neg_log(1 - p) + ls_coef * _neg_log(p)
    return _reduce(torch.where(observed == 1, as_positive, as_negative), reduce)


def epr_loss(
    logits: torch.Tensor, observed: torch.Tensor, expected_num_pos: float, *, reduce: Reduce | None = None
) -> torch.Tensor:
    """Observed labels only, plus the expected-positive regulariser; unobserved entries contribute nothing else."""
    p = torch.sigmoid(logits.float())
    return _reduce(_positive_and_negative_terms(p, observed), reduce) + expected_positive_regularizer(
        p, expected_num_pos
    )


def role_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    estimated: torch.Tensor,
    expected_num_pos: float,
    *,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """ROLE: the classifier and a per-image label estimator (``estimated``, probabilities with gradient) each fit the
    observed labels and the other's detached output, each with the EPR regulariser; the four parts are averaged."""
    p = torch.sigmoid(logits.float())
    q = estimated.float()
    q_target, p_target = q.detach(), p.detach()
    cross_classifier = q_target * _neg_log(p) + (1 - q_target) * _neg_log(1 - p)
    cross_estimator = p_target * _neg_log(q) + (1 - p_target) * _neg_log(1 - q)
    observed_terms = _positive_and_negative_terms(p, observed) + _positive_and_negative_terms(q, observed)
    matrix = 0.5 * observed_terms + 0.5 * (cross_classifier + cross_estimator)
    regularizer = 0.5 * (
        expected_positive_regularizer(p, expected_num_pos) + expected_positive_regularizer(q, expected_num_pos)
    )
    return _reduce(matrix, reduce) + regularizer


def em_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    alpha: float,
    *,
    pseudo_negative: torch.Tensor | None = None,
    soft_label: torch.Tensor | None = None,
    beta: float = 0.0,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Entropy maximisation (Zhou et al.): -log p on positives, -alpha * H(p) on unobserved entries.

    EM+APL also passes ``pseudo_negative`` (the unobserved entries pseudo-labelled as negatives) and their
    ``soft_label`` s: those entries leave the entropy term and get beta * BCE(p, s) instead.
    """
    p = torch.sigmoid(logits.float())
    entropy = p * _neg_log(p) + (1 - p) * _neg_log(1 - p)
    matrix = torch.where(observed == 0, -alpha * entropy, _positive_and_negative_terms(p, observed))
    if pseudo_negative is not None:
        s = soft_label.float()
        pseudo = beta * (s * _neg_log(p) + (1 - s) * _neg_log(1 - p))
        matrix = torch.where(pseudo_negative & (observed == 0), pseudo, matrix)
    return _reduce(matrix, reduce)


def asymmetric_pseudo_negatives(
    scores: torch.Tensor, observed: torch.Tensor, labelled: torch.Tensor, quota: torch.Tensor
) -> torch.Tensor:
    """APL's selection (Zhou et al.): per class, the ``quota[c]`` still-unlabelled unobserved entries with the lowest
    score become soft negatives whose soft label is that score. Returns an N x C mask of the newly chosen entries.

    ``scores`` (N x C) are the training images' current predictions, ``labelled`` the entries already pseudo-labelled.
    """
    candidates = (observed == 0) & ~labelled
    ranked = scores.float().masked_fill(~candidates, torch.inf)
    order = ranked.argsort(dim=0)  # per class, lowest first; non-candidates last
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(len(scores), device=scores.device).unsqueeze(1).expand_as(order))
    return candidates & (rank < quota.to(scores.device).unsqueeze(0))


# ---------------------------------------------------------------------------------------------------------------------
# GR Loss: "Boosting Single Positive Multi-label Classification with Generalized Robust Loss", Chen et al., IJCAI 2024
# (arXiv 2405.03501; authors' code: github.com/yan4xi1/GRLoss). The maths and the schedule follow the authors' released
# code (losses.py GR_loss, models.py KFunction / VFunction, train.py run_train); docs/gr_loss.md gives the sources and
# the few places where this implementation differs.

GR_LOG_EPSILON = 1e-7  # the authors' -log(p + 1e-7) on positives (the other baselines here use 1e-5, as Cole et al.)


class GRSchedule(NamedTuple):
    """GR Loss's hyper-parameters at one epoch: the soft pseudo-label k(p) = sigmoid(w * p + b) and the weight
    v(p) = exp(-(p - mu)^2 / (2 sigma^2))."""

    w: float
    b: float
    mu: float
    sigma: float


# The authors' released defaults (config.py of yan4xi1/GRLoss: --beta [0, 2, -2, -2] = (w start, w end, b start, b end),
# --alpha [0.5, 2, 0.8, 0.5] = (mu start, sigma start, mu end, sigma end), --q2q3 [0.01, 1]; the same values are the
# README's example; their --linear_init defaults to 0, as ``gr_loss``'s does). The repository publishes no per-dataset
# values, and the paper's per-dataset table could not be checked for this implementation, so every dataset starts
# from these (the GR entry of methods.py: a general default; a dataset entry may hold its own); docs/gr_loss.md says
# so. Pairs are (value at the start of the schedule, value at its end).
GR_RELEASED = {
    "w": (0.0, 2.0),
    "b": (-2.0, -2.0),
    "mu": (0.5, 0.8),
    "sigma": (2.0, 0.5),
    "q2": 0.01,
    "q3": 1.0,
}
GR_HYPERPARAMETERS = tuple(GR_RELEASED)
# Test mAP (%) published for GR Loss, ResNet-50 at 448 x 448, end-to-end: VOC and COCO from its paper, all four as
# GR Loss's row of AEVLP's comparison table (ICCV 2025; docs/gr_loss.md). None would mean not published; never a guess.
GR_PAPER_MAP: dict[str, float | None] = {"pascal": 89.83, "coco": 73.17, "nuswide": 49.08, "cub": 21.64}


def gr_problems(*, w, b, mu, sigma, q2, q3, linear_init, num_epochs: int) -> list[str]:
    """What is wrong with a GR Loss setting, one sentence per problem (empty when it is usable)."""
    problems = []
    pairs_ok = True
    for name, pair in (("w", w), ("b", b), ("mu", mu), ("sigma", sigma)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            problems.append(f"GR {name} takes two numbers, its start and end values (got {pair!r})")
            pairs_ok = False
    if pairs_ok and min(sigma) <= 0:
        problems.append(f"GR sigma is the width of the weight v(p) and must be > 0 at both ends (got {tuple(sigma)})")
    for name, q in (("q2", q2), ("q3", q3)):
        if not q > 0:
            problems.append(f"GR {name} is the exponent of a robust loss (1 - x^q) / q and must be > 0 (got {q})")
    if not 0 <= linear_init < num_epochs:
        problems.append(f"GR linear_init must lie in [0, num_epochs) (got {linear_init} with {num_epochs} epochs)")
    return problems


def gr_schedule(
    epoch: int,
    num_epochs: int,
    *,
    w: tuple[float, float],
    b: tuple[float, float],
    mu: tuple[float, float],
    sigma: tuple[float, float],
    linear_init: int = 0,
    q2: float | None = None,
    q3: float | None = None,
) -> GRSchedule:
    """GR Loss's (w, b, mu, sigma) at ``epoch`` (1-indexed): each moves linearly from its start to its end value over
    the ``num_epochs - linear_init`` epochs after the ``linear_init`` ones, as in the authors' train.py:

        w, b:      start + (end - start) * max(epoch - linear_init - 1, 0) / (num_epochs - linear_init)
        mu, sigma: start + (end - start) * max(epoch - linear_init, 0) / (num_epochs - linear_init)

    So k(p)'s (w, b) are at their start in the first epoch and one step short of their end in the last, while v(p)'s
    (mu, sigma) are one step in during the first epoch and at their end in the last (the released code's offsets,
    kept). Computed on the host from ints. ``q2`` and ``q3`` do not change over epochs; they are accepted (and ignored)
    so that a whole setting can be passed with ``**``.
    """
    problems = gr_problems(w=w, b=b, mu=mu, sigma=sigma, q2=1.0, q3=1.0, linear_init=linear_init, num_epochs=num_epochs)
    if problems:
        raise ValueError("; ".join(problems))
    return _gr_schedule_checked(epoch, num_epochs, w=w, b=b, mu=mu, sigma=sigma, linear_init=linear_init)


def _gr_schedule_checked(epoch: int, num_epochs: int, *, w, b, mu, sigma, linear_init: int) -> GRSchedule:
    """``gr_schedule`` for a setting ``gr_problems`` has already accepted (the epoch is still checked)."""
    if not 1 <= epoch <= num_epochs:
        raise ValueError(f"epoch is 1-indexed and at most num_epochs={num_epochs}, got {epoch}")
    span = num_epochs - linear_init
    k_step = max(epoch - linear_init - 1, 0) / span
    v_step = max(epoch - linear_init, 0) / span

    def at(pair, step):
        start, end = pair
        return start + (end - start) * step

    return GRSchedule(at(w, k_step), at(b, k_step), at(mu, v_step), at(sigma, v_step))


def gr_soft_label(p: torch.Tensor, w: float, b: float) -> torch.Tensor:
    """k(p) = sigmoid(w * p + b): the estimated probability that an unobserved label is a positive."""
    return torch.sigmoid(w * p + b)


def gr_weight(p: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """v(p) = exp(-(p - mu)^2 / (2 sigma^2)): the weight of an unobserved entry, largest for predictions near mu."""
    return torch.exp(-0.5 * ((p - mu) / sigma) ** 2)


def gr_loss_matrix(
    logits: torch.Tensor, observed: torch.Tensor, *, w: float, b: float, mu: float, sigma: float, q2: float, q3: float
) -> torch.Tensor:
    """GR Loss per entry (B x C, fp32) for one epoch's (w, b, mu, sigma):

    - observed positive (1):  -log(p + 1e-7)
    - unobserved (0):         v(p) * [k(p) * (1 - p^q2) / q2 + (1 - k(p)) * (1 - (1 - p)^q3) / q3]
    - observed negative (-1): -log(1 - p + 1e-7) (a plain negative, as in every loss of this file)

    with p = sigmoid(logits); k and v are computed from p detached (no gradient flows through them), as the authors
    do. p^q and (1 - p)^q are evaluated as exp(q * logsigmoid(+-z)): the same values, with a finite gradient even
    where p rounds to 0 or 1.
    """
    if logits.dim() != 2 or logits.shape != observed.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and observed {tuple(observed.shape)} must be the same B x C")
    z = logits.float()
    p = torch.sigmoid(z)
    p_fixed = p.detach()
    k = gr_soft_label(p_fixed, w, b)
    v = gr_weight(p_fixed, mu, sigma)
    towards_positive = (1 - torch.exp(q2 * F.logsigmoid(z))) / q2  # (1 - p^q2) / q2
    towards_negative = (1 - torch.exp(q3 * F.logsigmoid(-z))) / q3  # (1 - (1 - p)^q3) / q3
    unobserved = v * (k * towards_positive + (1 - k) * towards_negative)
    positive = -torch.log(p + GR_LOG_EPSILON)
    negative = -torch.log(1 - p + GR_LOG_EPSILON)
    return torch.where(observed == 1, positive, torch.where(observed == -1, negative, unobserved))


def gr_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    *,
    epoch: int,
    num_epochs: int,
    w: tuple[float, float],
    b: tuple[float, float],
    mu: tuple[float, float],
    sigma: tuple[float, float],
    q2: float,
    q3: float,
    linear_init: int = 0,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """GR Loss of a batch at ``epoch`` of ``num_epochs``: ``gr_loss_matrix`` with ``gr_schedule``'s values, averaged
    over all B*C entries as the authors do (``reduce``: as in ``large_loss``). ``w``, ``b``, ``mu``, ``sigma`` are
    (start, end) pairs; ``GR_RELEASED`` holds a whole setting: ``gr_loss(z, y, epoch=e, num_epochs=T,
    **GR_RELEASED)``. ``linear_init`` only delays the schedule, as the authors' --linear_init does; freezing the
    backbone during those epochs (what their flag also does) is the trainer's business. No host synchronisation."""
    problems = gr_problems(w=w, b=b, mu=mu, sigma=sigma, q2=q2, q3=q3, linear_init=linear_init, num_epochs=num_epochs)
    if problems:
        raise ValueError("; ".join(problems))
    now = _gr_schedule_checked(epoch, num_epochs, w=w, b=b, mu=mu, sigma=sigma, linear_init=linear_init)
    matrix = gr_loss_matrix(logits, observed, w=now.w, b=now.b, mu=now.mu, sigma=now.sigma, q2=q2, q3=q3)
    return _reduce(matrix, reduce)
