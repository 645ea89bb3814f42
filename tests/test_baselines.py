"""The baseline losses (Cole et al.; Zhou et al.) and APL's selection, on cases small enough to compute by hand."""

import math

import pytest
import torch

import losses

LOGITS = torch.tensor([[0.0, 1.0, -1.0], [2.0, -0.5, 0.5]])
OBSERVED = torch.tensor([[1, 0, 0], [0, 1, 0]])


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def nl(x: float) -> float:  # the authors' -log(x + 1e-5)
    return -math.log(x + 1e-5)


P = [[sig(z) for z in row] for row in LOGITS.tolist()]
POS = [(0, 0), (1, 1)]
UNOBSERVED = [(0, 1), (0, 2), (1, 0), (1, 2)]


def test_wan_weights_unobserved_negatives_by_one_over_c_minus_one():
    expected = sum(nl(P[i][j]) for i, j in POS) + sum(nl(1 - P[i][j]) / 2 for i, j in UNOBSERVED)
    assert losses.wan_loss(LOGITS, OBSERVED).item() == pytest.approx(expected / 6, rel=1e-6)


def test_lsan_smooths_every_target_by_ls_coef():
    pos = sum(0.9 * nl(P[i][j]) + 0.1 * nl(1 - P[i][j]) for i, j in POS)
    neg = sum(0.9 * nl(1 - P[i][j]) + 0.1 * nl(P[i][j]) for i, j in UNOBSERVED)
    assert losses.lsan_loss(LOGITS, OBSERVED, 0.1).item() == pytest.approx((pos + neg) / 6, rel=1e-6)


def test_epr_fits_positives_and_regularises_the_expected_count():
    k = 1.5
    mean_count = (sum(P[0]) + sum(P[1])) / 2
    expected = sum(nl(P[i][j]) for i, j in POS) / 6 + (mean_count - k) ** 2 / 9
    assert losses.epr_loss(LOGITS, OBSERVED, k).item() == pytest.approx(expected, rel=1e-6)


def test_role_averages_classifier_and_estimator_terms():
    q = [[0.9, 0.3, 0.6], [0.2, 0.8, 0.5]]
    k = 1.5
    total = 0.0
    for i in range(2):
        for j in range(3):
            p_ij, q_ij = P[i][j], q[i][j]
            if (i, j) in POS:
                total += 0.5 * (nl(p_ij) + nl(q_ij))
            total += 0.5 * (q_ij * nl(p_ij) + (1 - q_ij) * nl(1 - p_ij) + p_ij * nl(q_ij) + (1 - p_ij) * nl(1 - q_ij))
    reg_p = ((sum(P[0]) + sum(P[1])) / 2 - k) ** 2 / 9
    reg_q = ((sum(q[0]) + sum(q[1])) / 2 - k) ** 2 / 9
    expected = total / 6 + 0.5 * (reg_p + reg_q)
    estimated = torch.tensor(q, requires_grad=True)
    logits = LOGITS.clone().requires_grad_(True)
    loss = losses.role_loss(logits, OBSERVED, estimated, k)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()  # each side learns from the other's detached output: both get gradients
    assert logits.grad.abs().sum() > 0 and estimated.grad.abs().sum() > 0


def test_em_maximises_the_entropy_of_unobserved_entries():
    alpha = 0.1
    pos = sum(nl(P[i][j]) for i, j in POS)
    ent = sum(P[i][j] * nl(P[i][j]) + (1 - P[i][j]) * nl(1 - P[i][j]) for i, j in UNOBSERVED)
    assert losses.em_loss(LOGITS, OBSERVED, alpha).item() == pytest.approx((pos - alpha * ent) / 6, rel=1e-6)


def test_em_apl_gives_pseudo_negatives_a_weighted_soft_bce():
    alpha, beta = 0.1, 0.5
    pseudo = torch.tensor([[False, False, True], [False, False, False]])  # (0, 2) is a pseudo negative, s = 0.2
    soft = torch.tensor([[0.0, 0.0, 0.2], [0.0, 0.0, 0.0]])
    pos = sum(nl(P[i][j]) for i, j in POS)
    ent = sum(P[i][j] * nl(P[i][j]) + (1 - P[i][j]) * nl(1 - P[i][j]) for i, j in UNOBSERVED if (i, j) != (0, 2))
    apl = beta * (0.2 * nl(P[0][2]) + 0.8 * nl(1 - P[0][2]))
    got = losses.em_loss(LOGITS, OBSERVED, alpha, pseudo_negative=pseudo, soft_label=soft, beta=beta)
    assert got.item() == pytest.approx((pos - alpha * ent + apl) / 6, rel=1e-6)


def test_apl_picks_each_class_lowest_scored_unlabelled_unobserved_entries():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.1, 0.05], [0.4, 0.6]])
    observed = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0]])
    labelled = torch.tensor([[False, True], [False, False], [False, False], [False, False]])
    quota = torch.tensor([2, 1])
    chosen = losses.asymmetric_pseudo_negatives(scores, observed, labelled, quota)
    # class 0: candidates rows 1 (0.2), 2 (0.1), 3 (0.4) -> the two lowest: rows 2 and 1 (row 0 is observed)
    # class 1: candidates rows 1 (0.3), 3 (0.6) -> row 1 (row 0 already labelled, row 2 observed positive)
    assert chosen.tolist() == [[False, False], [True, True], [True, False], [False, False]]


def test_observed_negatives_are_plain_negatives_in_every_baseline():
    observed = torch.tensor([[1, -1, 0]])
    logits = torch.tensor([[0.3, 2.0, -1.0]])
    p = [sig(z) for z in logits[0].tolist()]
    # WAN: the observed negative gets full weight, the unobserved one 1 / (C - 1)
    expected = (nl(p[0]) + nl(1 - p[1]) + nl(1 - p[2]) / 2) / 3
    assert losses.wan_loss(logits, observed).item() == pytest.approx(expected, rel=1e-6)
