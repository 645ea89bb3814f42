"""The diagnostics of the paper's memorisation analysis, collected from the training forward passes (no extra
pass): losses and probabilities of false and true negatives, the precision of what LL rejected or corrected."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from label_state import LabelState

# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics (the paper's memorisation analysis), from the training forward passes.


class Diagnostics:
    """Per epoch, on the device: AN loss and predicted probability on false-negative entries (unobserved, truly
    positive) versus true-negative entries (unobserved, truly negative), and the number and precision (fraction truly
    positive) of the entries LL selected. "Unobserved" refers to the labels before any correction."""

    _FIELDS = ("fn_count", "fn_loss", "fn_prob", "tn_count", "tn_loss", "tn_prob", "selected", "selected_true")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)

    def update(
        self,
        logits: torch.Tensor,
        initial: torch.Tensor,
        clean: torch.Tensor,
        selected: torch.Tensor,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. ``real``: which rows count (padding rows under torchrun do not). Masks are applied by
        arithmetic (``torch.where``), never by boolean indexing, so nothing here waits for the GPU."""
        logits = logits.detach().float()
        prob, an_loss = torch.sigmoid(logits).double(), F.softplus(logits).double()  # softplus(z) = BCE(z, 0)
        unobserved = initial == 0
        if real is not None:
            unobserved = unobserved & real[:, None]
            selected = selected & real[:, None]
        false_neg, true_neg = unobserved & clean, unobserved & ~clean
        zero = torch.zeros((), dtype=torch.float64, device=logits.device)
        self.sums += torch.stack(
            [
                false_neg.sum().double(),
                torch.where(false_neg, an_loss, zero).sum(),
                torch.where(false_neg, prob, zero).sum(),
                true_neg.sum().double(),
                torch.where(true_neg, an_loss, zero).sum(),
                torch.where(true_neg, prob, zero).sum(),
                selected.sum().double(),
                (selected & clean).sum().double(),
            ]
        )

    def summary(self) -> dict:
        s = dict(zip(self._FIELDS, self.sums.tolist(), strict=True))

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "fn_loss": ratio(s["fn_loss"], s["fn_count"]),
            "tn_loss": ratio(s["tn_loss"], s["tn_count"]),
            "fn_prob": ratio(s["fn_prob"], s["fn_count"]),
            "tn_prob": ratio(s["tn_prob"], s["tn_count"]),
            "selected_precision": ratio(s["selected_true"], s["selected"]),
        }


def corrected_labels_summary(state: LabelState) -> dict:
    """LL-Cp: how many labels have been corrected to positive so far, and the fraction that is truly positive."""
    corrected = (state.observed.matrix == 1) & (state.initial == 0)
    count = int(corrected.sum())
    return {
        "corrected_total": count,
        "corrected_precision": int((corrected & state.clean).sum()) / count if count else None,
    }
