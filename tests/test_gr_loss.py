"""GR Loss (Chen et al., IJCAI 2024): each term, the epoch schedule and the batch mean, on cases computed by hand with
plain Python maths (never by calling the function under test a second time)."""

import math

import pytest
import torch
from conftest import BUILT_IN_DATASETS

import config
from losses import (
    GR_HYPERPARAMETERS,
    GR_PAPER_MAP,
    GR_RELEASED,
    gr_loss,
    gr_loss_matrix,
    gr_problems,
    gr_schedule,
)


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def unobserved_term(z: float, w: float, b: float, mu: float, sigma: float, q2: float, q3: float) -> float:
    """v(p) * [k(p) (1 - p^q2) / q2 + (1 - k(p)) (1 - (1 - p)^q3) / q3], written out from the paper's definitions."""
    p = sig(z)
    k = sig(w * p + b)
    v = math.exp(-((p - mu) ** 2) / (2 * sigma**2))
    return v * (k * (1 - p**q2) / q2 + (1 - k) * (1 - (1 - p) ** q3) / q3)


def one(z: float, y: int, **params) -> float:
    return gr_loss_matrix(torch.tensor([[z]]), torch.tensor([[y]]), **params).item()


# One epoch's values, deliberately unlike each other so that a swapped argument changes the result.
EPOCH = dict(w=1.5, b=-1.0, mu=0.6, sigma=0.4, q2=0.5, q3=0.7)


# ------------------------------------------------------------------------------------------------------------- terms


@pytest.mark.parametrize("z", [-3.0, 0.0, 2.0])
def test_positive_term_is_minus_log_p_with_the_authors_epsilon(z):
    assert one(z, 1, **EPOCH) == pytest.approx(-math.log(sig(z) + 1e-7), rel=1e-6)


@pytest.mark.parametrize("z", [-3.0, 0.0, 2.0])
def test_observed_negative_is_a_plain_negative(z):
    assert one(z, -1, **EPOCH) == pytest.approx(-math.log(1 - sig(z) + 1e-7), rel=1e-6)


@pytest.mark.parametrize("z", [-3.0, -0.4, 0.5, 2.5])
def test_unobserved_term_by_hand(z):
    # z = 0.5: p = 0.622459, k = sig(1.5 p - 1) = 0.483428, v = exp(-(0.022459)^2 / 0.32) = 0.998425,
    # (1 - p^0.5) / 0.5 = 0.422078, (1 - (1 - p)^0.7) / 0.7 = 0.706173
    # -> 0.998425 * (0.483428 * 0.422078 + 0.516572 * 0.706173) = 0.998425 * (0.204045 + 0.364789) = 0.567938
    assert one(z, 0, **EPOCH) == pytest.approx(unobserved_term(z, **EPOCH), rel=1e-5)
    if z == 0.5:
        assert one(z, 0, **EPOCH) == pytest.approx(0.567938, abs=2e-6)


def test_q2_belongs_to_the_positive_side_and_q3_to_the_negative_side():
    # k close to 1 leaves only (1 - p^q2) / q2; k close to 0 only (1 - (1 - p)^q3) / q3. Swapping q2 and q3 fails.
    p = sig(0.5)
    only_positive = dict(EPOCH, w=0.0, b=30.0, mu=p)  # v(p) = 1 exactly at mu = p
    only_negative = dict(EPOCH, w=0.0, b=-30.0, mu=p)
    assert one(0.5, 0, **only_positive) == pytest.approx((1 - p**0.5) / 0.5, rel=1e-6)
    assert one(0.5, 0, **only_negative) == pytest.approx((1 - (1 - p) ** 0.7) / 0.7, rel=1e-6)


def test_q3_one_makes_the_negative_side_the_absolute_error():
    # The released q3 = 1: (1 - (1 - p)) / 1 = p.
    p = sig(-1.2)
    assert one(-1.2, 0, **dict(EPOCH, w=0.0, b=-30.0, mu=p, q3=1.0)) == pytest.approx(p, rel=1e-6)


def test_weight_v_is_a_gaussian_bump_around_mu():
    # Same entry, mu at p (v = 1) and mu one sigma away (v = exp(-1/2)): the loss scales by exactly that factor.
    p = sig(0.3)
    at_mu = one(0.3, 0, **dict(EPOCH, mu=p))
    one_sigma_away = one(0.3, 0, **dict(EPOCH, mu=p + 0.4))
    assert one_sigma_away / at_mu == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_gradient_of_an_unobserved_entry_treats_k_and_v_as_constants():
    # d/dz of v [k (1 - p^q2)/q2 + (1 - k)(1 - (1 - p)^q3)/q3] with k, v held fixed (the authors detach them):
    #   v [-k p^q2 (1 - p) + (1 - k) p (1 - p)^q3]
    # Letting gradient flow through k or v, or a wrong sign, changes it.
    for z in (-1.0, 0.5, 2.0):
        p = sig(z)
        k = sig(EPOCH["w"] * p + EPOCH["b"])
        v = math.exp(-((p - EPOCH["mu"]) ** 2) / (2 * EPOCH["sigma"] ** 2))
        expected = v * (-k * p ** EPOCH["q2"] * (1 - p) + (1 - k) * p * (1 - p) ** EPOCH["q3"])
        logits = torch.tensor([[z]], requires_grad=True)
        gr_loss_matrix(logits, torch.tensor([[0]]), **EPOCH).sum().backward()
        assert logits.grad.item() == pytest.approx(expected, rel=1e-5)


def test_soft_label_sets_the_direction_of_the_push():
    # An unobserved entry believed positive (k ~ 1) is pushed up, one believed negative (k ~ 0) is pushed down.
    for b, sign in ((30.0, -1), (-30.0, 1)):
        logits = torch.tensor([[0.2]], requires_grad=True)
        gr_loss_matrix(logits, torch.tensor([[0]]), **dict(EPOCH, w=0.0, b=b)).sum().backward()
        assert sign * logits.grad.item() > 0


# ----------------------------------------------------------------------------------------------------------- schedule

RELEASED = dict(w=(0.0, 2.0), b=(-2.0, -2.0), mu=(0.5, 0.8), sigma=(2.0, 0.5))


@pytest.mark.parametrize(
    "epoch, expected",
    [
        # w, b lag one epoch behind mu, sigma (the released train.py): steps (epoch - 1) / 8 and epoch / 8.
        (1, (0.0, -2.0, 0.5375, 1.8125)),
        (4, (0.75, -2.0, 0.65, 1.25)),
        (8, (1.75, -2.0, 0.8, 0.5)),
    ],
)
def test_schedule_of_the_released_defaults_over_8_epochs(epoch, expected):
    assert tuple(gr_schedule(epoch, 8, **RELEASED)) == pytest.approx(expected, abs=1e-12)


def test_schedule_waits_for_linear_init_epochs():
    # linear_init 2 of 10 epochs: epochs 1-2 at the start values, then steps over the remaining 8.
    setting = dict(w=(0.0, 8.0), b=(-2.0, 6.0), mu=(0.0, 0.8), sigma=(1.0, 0.2))
    assert tuple(gr_schedule(1, 10, **setting, linear_init=2)) == pytest.approx((0.0, -2.0, 0.0, 1.0))
    assert tuple(gr_schedule(2, 10, **setting, linear_init=2)) == pytest.approx((0.0, -2.0, 0.0, 1.0))
    assert tuple(gr_schedule(3, 10, **setting, linear_init=2)) == pytest.approx((0.0, -2.0, 0.1, 0.9))
    assert tuple(gr_schedule(10, 10, **setting, linear_init=2)) == pytest.approx((7.0, 5.0, 0.8, 0.2))


def test_schedule_accepts_a_whole_setting():
    assert gr_schedule(1, 8, **GR_RELEASED) == gr_schedule(1, 8, **RELEASED)


# ---------------------------------------------------------------------------------------------------------- the batch


def test_batch_loss_is_the_mean_over_all_entries_with_the_epoch_values():
    # T = 4, epoch 3: w = 0 + 2 * 2/4 = 1.0, b = -2 + 1 * 2/4 = -1.5, mu = 0.5 + 0.4 * 3/4 = 0.8,
    # sigma = 1 - 0.5 * 3/4 = 0.625.
    setting = dict(w=(0.0, 2.0), b=(-2.0, -1.0), mu=(0.5, 0.9), sigma=(1.0, 0.5), q2=0.5, q3=1.0)
    now = dict(w=1.0, b=-1.5, mu=0.8, sigma=0.625, q2=0.5, q3=1.0)
    logits = torch.tensor([[2.0, 1.5, -1.0], [0.5, -2.0, 3.0]])
    observed = torch.tensor([[1, 0, 0], [0, -1, 0]])
    entries = [
        -math.log(sig(2.0) + 1e-7),
        unobserved_term(1.5, **now),
        unobserved_term(-1.0, **now),
        unobserved_term(0.5, **now),
        -math.log(1 - sig(-2.0) + 1e-7),
        unobserved_term(3.0, **now),
    ]
    loss = gr_loss(logits, observed, epoch=3, num_epochs=4, **setting)
    assert loss.item() == pytest.approx(sum(entries) / 6, rel=1e-6)
    total = gr_loss(logits, observed, epoch=3, num_epochs=4, **setting, reduce=lambda m: m.sum())
    assert total.item() == pytest.approx(sum(entries), rel=1e-6)


@pytest.mark.parametrize("observed", [1, 0, -1])
def test_gradients_stay_finite_where_p_rounds_to_0_or_1(observed):
    # sigmoid(-120) is 0 in fp32, where the derivative of p^0.01 is infinite: the log-space form keeps it finite.
    logits = torch.tensor([[-200.0, -120.0, -30.0, 0.0, 30.0, 120.0, 200.0]], requires_grad=True)
    loss = gr_loss(logits, torch.full((1, 7), observed), epoch=1, num_epochs=8, **GR_RELEASED)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bfloat16_logits_give_an_fp32_loss():
    logits = torch.tensor([[2.0, -1.0]]).bfloat16()
    loss = gr_loss(logits, torch.tensor([[1, 0]]), epoch=2, num_epochs=8, **GR_RELEASED)
    assert loss.dtype == torch.float32


# -------------------------------------------------------------------------------------------------- settings, errors


def test_defaults_are_the_released_values_for_every_dataset():
    released = dict(RELEASED, q2=0.01, q3=1.0)
    assert tuple(GR_RELEASED) == GR_HYPERPARAMETERS and GR_RELEASED == released
    assert gr_problems(**GR_RELEASED, linear_init=0, num_epochs=10) == []
    for dataset in BUILT_IN_DATASETS:  # the GR entry's general default; no built-in dataset has its own
        cfg = config.parse_config(["--dataset", dataset, "--loss", "gr", "--exp_name", "x"])
        assert {k: getattr(cfg, f"gr_{k}") for k in GR_HYPERPARAMETERS} == released, dataset


def test_published_numbers():
    assert GR_PAPER_MAP["pascal"] == 89.83 and GR_PAPER_MAP["coco"] == 73.17
    assert GR_PAPER_MAP["nuswide"] == 49.08 and GR_PAPER_MAP["cub"] == 21.64
    assert set(GR_PAPER_MAP) == {"pascal", "coco", "nuswide", "cub"}


@pytest.mark.parametrize(
    "change, phrase",
    [
        (dict(sigma=(2.0, 0.0)), "sigma"),
        (dict(q2=0.0), "q2"),
        (dict(q3=-1.0), "q3"),
        (dict(w=(1.0,)), "w takes two numbers"),
        (dict(linear_init=8), "linear_init"),
    ],
)
def test_bad_settings_are_refused_with_the_name_of_the_value(change, phrase):
    setting = dict(GR_RELEASED, linear_init=0) | change
    with pytest.raises(ValueError, match=phrase):
        gr_loss(torch.zeros(1, 2), torch.tensor([[1, 0]]), epoch=1, num_epochs=8, **setting)


@pytest.mark.parametrize("epoch", [0, 9])
def test_epochs_outside_the_run_are_refused(epoch):
    with pytest.raises(ValueError, match="epoch"):
        gr_schedule(epoch, 8, **RELEASED)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same B x C"):
        gr_loss(torch.zeros(2, 3), torch.zeros(2, 2), epoch=1, num_epochs=8, **GR_RELEASED)
