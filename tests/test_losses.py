"""The large-loss schemes and their schedule, on cases small enough to compute by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import SCHEMES, large_loss, modification_rate, num_to_select, select_largest


def bce(z: float, y: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


# ---------------------------------------------------------------------------------------------------------------- rate


@pytest.mark.parametrize(
    "scheme, expected",
    [
        ("AN", [0.0, 0.0, 0.0, 0.0]),
        ("LL-R", [0.0, 0.002, 0.004, 0.006]),
        ("LL-Ct", [0.0, 0.002, 0.004, 0.006]),
        ("LL-Cp", [0.0, 0.002, 0.002, 0.002]),
    ],
)
def test_modification_rate_schedule(scheme, expected):
    got = [modification_rate(scheme, epoch, delta_rel=0.2) for epoch in (1, 2, 3, 4)]
    assert got == pytest.approx(expected, abs=1e-15)


def test_modification_rate_rejects_bad_input():
    with pytest.raises(ValueError):
        modification_rate("LL-R", 0, 0.2)  # epochs are 1-indexed
    with pytest.raises(ValueError):
        modification_rate("LL-X", 2, 0.2)
    with pytest.raises(ValueError):
        modification_rate("LL-R", 2, -0.1)


def test_modification_rate_never_exceeds_one():
    # A large --delta_rel used to log rates above 1 (the share of a batch cannot pass 100 %).
    assert modification_rate("LL-R", 3, delta_rel=100) == 1.0  # 2.0 before the cap
    assert modification_rate("LL-Ct", 5, delta_rel=30) == 1.0  # 1.2
    assert modification_rate("LL-Cp", 2, delta_rel=150) == 1.0  # 1.5
    assert modification_rate("LL-R", 2, delta_rel=100) == 1.0  # exactly 1 stays 1
    # Below 1, exactly the formula's value.
    assert modification_rate("LL-R", 3, delta_rel=40) == (3 - 1) * 40 / 100
    assert modification_rate("LL-Ct", 10, delta_rel=11) == (10 - 1) * 11 / 100
    assert modification_rate("LL-Cp", 7, delta_rel=99) == 99 / 100


def test_num_to_select_is_ceil_and_ignores_float_noise():
    assert num_to_select(16, 20, 0.002) == 1  # 0.64 -> 1
    assert num_to_select(16, 80, 0.004) == 6  # 5.12 -> 6
    assert num_to_select(16, 80, 0.005) == 7  # 6.4 -> 7
    rate = modification_rate("LL-R", 4, 0.1)  # (4 - 1) * 0.1 / 100
    assert 100 * 10 * rate == 3.0000000000000004  # float noise exists ...
    assert num_to_select(100, 10, rate) == 3  # ... but does not add an entry
    assert num_to_select(4, 4, 0.0) == 0


# ---------------------------------------------------------------------------------------------------------- hand cases
# Two images, three classes. Observed: +1 positive, -1 observed negative, 0 unobserved.
LOGITS = torch.tensor([[2.0, 1.5, -1.0], [0.5, -2.0, 3.0]])
OBSERVED = torch.tensor([[1, 0, 0], [0, -1, 0]])
# AN losses: targets max(y, 0). Unobserved entries: (0,1) z=1.5, (0,2) z=-1, (1,0) z=0.5, (1,2) z=3.
AN = [[bce(2.0, 1), bce(1.5, 0), bce(-1.0, 0)], [bce(0.5, 0), bce(-2.0, 0), bce(3.0, 0)]]
# Unobserved losses ordered: (1,2) 3.049 > (0,1) 1.701 > (1,0) 0.974 > (0,2) 0.313


def test_an_is_plain_bce():
    loss, selected = large_loss(LOGITS, OBSERVED, "AN", rate=0.5)
    assert loss.item() == pytest.approx(sum(map(sum, AN)) / 6, rel=1e-6)
    assert not selected.any()


def test_ll_r_rejects_the_k_largest_unobserved_losses():
    # rate 1/3: k = ceil(6 / 3) = 2 -> entries (1,2) and (0,1) get loss 0.
    loss, selected = large_loss(LOGITS, OBSERVED, "LL-R", rate=1 / 3)
    expected_mask = torch.tensor([[False, True, False], [False, False, True]])
    assert torch.equal(selected, expected_mask)
    kept = AN[0][0] + AN[0][2] + AN[1][0] + AN[1][1]
    assert loss.item() == pytest.approx(kept / 6, rel=1e-6)  # the mean still divides by all B*C entries


@pytest.mark.parametrize("scheme", ["LL-Ct", "LL-Cp"])
def test_ll_ct_and_cp_correct_the_selected_entries_to_positive(scheme):
    # rate 0.1: k = ceil(0.6) = 1 -> only (1,2) is corrected: its loss becomes BCE(3, 1).
    loss, selected = large_loss(LOGITS, OBSERVED, scheme, rate=0.1)
    assert selected.nonzero().tolist() == [[1, 2]]
    total = sum(map(sum, AN)) - AN[1][2] + bce(3.0, 1)
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)


def test_observed_entries_are_never_selected_even_when_k_exceeds_the_candidates():
    # Observed negative (1,1) has a huge loss; observed positive (0,0) too. k = 6 > 4 unobserved entries.
    logits = torch.tensor([[-9.0, 1.5, -1.0], [0.5, 9.0, 3.0]])
    for scheme in ("LL-R", "LL-Ct", "LL-Cp"):
        loss, selected = large_loss(logits, OBSERVED, scheme, rate=1.0)
        assert torch.equal(selected, OBSERVED == 0), scheme
        observed_part = bce(-9.0, 1) + bce(9.0, 0)
        if scheme == "LL-R":
            assert loss.item() == pytest.approx(observed_part / 6, rel=1e-6)
        else:
            corrected = bce(1.5, 1) + bce(-1.0, 1) + bce(0.5, 1) + bce(3.0, 1)
            assert loss.item() == pytest.approx((observed_part + corrected) / 6, rel=1e-6)


def test_smaller_last_batch_uses_its_own_size():
    # rate 0.2 with C = 3: a full batch of 5 selects ceil(3.0) = 3, the last batch of 1 selects ceil(0.6) = 1.
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    observed = torch.zeros(5, 3, dtype=torch.long)
    assert large_loss(logits, observed, "LL-R", 0.2)[1].sum() == 3
    assert large_loss(logits[:1], observed[:1], "LL-R", 0.2)[1].sum() == 1


def test_rate_zero_selects_nothing():
    loss_an, _ = large_loss(LOGITS, OBSERVED, "AN", 0.0)
    for scheme in SCHEMES:
        loss, selected = large_loss(LOGITS, OBSERVED, scheme, 0.0)
        assert not selected.any() and loss.item() == pytest.approx(loss_an.item())


def test_matches_a_sort_based_reference_on_random_batches():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        b, c = torch.randint(1, 9, (2,), generator=gen).tolist()
        logits = torch.randn(b, c, generator=gen) * 3
        observed = torch.randint(-1, 2, (b, c), generator=gen)
        rate = float(torch.rand((), generator=gen)) * 0.5
        loss, selected = large_loss(logits, observed, "LL-Ct", rate)
        an = F.binary_cross_entropy_with_logits(logits, observed.clamp(min=0).float(), reduction="none")
        candidates = [(an[i, j].item(), i, j) for i in range(b) for j in range(c) if observed[i, j] == 0]
        k = min(math.ceil(round(b * c * rate, 9)), len(candidates))
        expected = torch.zeros(b, c, dtype=torch.bool)
        for _, i, j in sorted(candidates, reverse=True)[:k]:
            expected[i, j] = True
        assert torch.equal(selected, expected)
        ref = torch.where(expected, F.binary_cross_entropy_with_logits(logits, torch.ones(b, c), reduction="none"), an)
        assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-6)


def test_gradients_flow_only_through_kept_terms():
    logits = LOGITS.clone().requires_grad_(True)
    loss, selected = large_loss(logits, OBSERVED, "LL-R", rate=1 / 3)
    loss.backward()
    assert (logits.grad[selected] == 0).all()
    assert (logits.grad[~selected] != 0).all()


def test_select_largest_returns_exactly_k():
    losses_ = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    mask = select_largest(losses_, torch.ones_like(losses_, dtype=torch.bool), 2)
    assert mask.sum() == 2 and not mask[0, 3]  # ties at the threshold: still exactly k, never the smaller loss


def test_bad_shapes_and_schemes_raise():
    with pytest.raises(ValueError):
        large_loss(LOGITS, OBSERVED[:1], "LL-R", 0.1)
    with pytest.raises(ValueError):
        large_loss(LOGITS, OBSERVED, "ll-r", 0.1)


def test_bfloat16_logits_give_fp32_loss():
    loss, _ = large_loss(LOGITS.bfloat16(), OBSERVED, "LL-R", 0.1)
    assert loss.dtype == torch.float32
