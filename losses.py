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

import torch
import torch.nn.functional as F

SCHEMES = ("AN", "LL-R", "LL-Ct", "LL-Cp")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def modification_rate(scheme: str, epoch: int, delta_rel: float) -> float:
    """Fraction of a batch's B*C label entries to reject or correct at ``epoch`` (1-indexed).

    ``delta_rel`` is in percent per epoch, as on the official command line. LL-R and LL-Ct grow the rate linearly,
    (epoch - 1) * delta_rel / 100 (the paper's Delta_rel schedule); LL-Cp corrects a constant delta_rel / 100 per
    epoch because its corrections accumulate in the label matrix. Epoch 1 is never modified: the model first has to
    learn the clean patterns before large losses mean anything.
    """
    _check_scheme(scheme)
    if epoch < 1:
        raise ValueError(f"epoch is 1-indexed, got {epoch}")
    if delta_rel < 0:
        raise ValueError(f"delta_rel must be >= 0, got {delta_rel}")
    if scheme == "AN" or epoch == 1:
        return 0.0
    if scheme == "LL-Cp":
        return delta_rel / 100
    return (epoch - 1) * delta_rel / 100


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


def large_loss(
    logits: torch.Tensor, observed: torch.Tensor, scheme: str, rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch loss and the B x C mask of the unobserved entries it rejected or corrected.

    loss = mean over all B*C entries of l, where l = BCE(z, max(y, 0)) elementwise (AN), except on the
    k = ceil(B*C*rate) unobserved entries with the largest l: there l = 0 for LL-R (rejection) and l = BCE(z, 1) for
    LL-Ct and LL-Cp (temporary correction; LL-Cp's permanent update of the label matrix is the caller's job, using the
    returned mask). ``scheme="AN"`` is plain BCE and selects nothing. Computed in fp32 whatever the logits' dtype.
    """
    _check_scheme(scheme)
    if logits.dim() != 2 or logits.shape != observed.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and observed {tuple(observed.shape)} must be the same B x C")
    logits = logits.float()
    loss_matrix = F.binary_cross_entropy_with_logits(logits, observed.clamp(min=0).float(), reduction="none")
    k = 0 if scheme == "AN" else num_to_select(logits.shape[0], logits.shape[1], rate)
    selected = select_largest(loss_matrix, observed == 0, k)
    if scheme == "LL-R":
        loss_matrix = loss_matrix.masked_fill(selected, 0.0)
    elif scheme in ("LL-Ct", "LL-Cp"):
        corrected = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
        loss_matrix = torch.where(selected, corrected, loss_matrix)
    return loss_matrix.mean(), selected
