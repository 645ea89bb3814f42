"""--label_proportion draws HCP-MLR-PL's known-label mask exactly with --label_proportion_seed 0, and files of
different seeds never mix."""

import numpy as np
import pytest

import label_rules
from config import parse_config


def hcp_mlr_pl_draw(labels01: np.ndarray, proportion: float) -> np.ndarray:
    """HCP-MLR-PL's ``changeLabelProportion`` re-implemented from its algorithm (github.com/HCPLab-SYSU/HCP-MLR-PL,
    datasets/*.py): labels as +1/-1; the global NumPy generator seeded with 0; one uniform per entry of the N x C
    shape; entries whose uniform is below the proportion keep their label, the rest become 0."""
    labels = np.where(labels01 > 0, 1, -1)
    state = np.random.get_state()
    try:
        np.random.seed(0)
        mask = np.random.random(labels.shape)
    finally:
        np.random.set_state(state)
    mask[mask < proportion] = 1
    mask[mask < 1] = 0
    return mask * labels


@pytest.mark.parametrize("proportion", [0.1, 0.3, 0.5, 0.9, 1.0])
def test_seed_0_draws_hcp_mlr_pls_mask_element_for_element(proportion):
    labels = (np.random.default_rng(1).random((53, 20)) < 0.15).astype(np.float32)
    ours = label_rules.observe_label_proportion(labels, proportion, seed=label_rules.HCP_MLR_PL_SEED)
    np.testing.assert_array_equal(ours, hcp_mlr_pl_draw(labels, proportion))


def test_the_default_seed_is_another_draw():
    labels = (np.random.default_rng(1).random((53, 20)) < 0.15).astype(np.float32)
    ours = label_rules.observe_label_proportion(labels, 0.3)  # seed 1200, the official single-positive generator's
    assert (ours != hcp_mlr_pl_draw(labels, 0.3)).mean() > 0.2


def test_the_seed_flag_reaches_the_draw_and_names_its_files():
    cfg = parse_config(["--label_proportion", "0.3", "--label_proportion_seed", "0", "--exp_name", "x"])
    regime = label_rules.regime_of(cfg)
    assert regime == label_rules.Regime(proportion=0.3, proportion_seed=0)
    assert regime.file("train") == "formatted_train_labels_obs_prop0.3_seed0.npy"
    default = label_rules.regime_of(parse_config(["--label_proportion", "0.3", "--exp_name", "x"]))
    assert default.file("train") == "formatted_train_labels_obs_prop0.3.npy" and default.proportion_seed == 1200
    labels = (np.random.default_rng(2).random((30, 7)) < 0.3).astype(np.float32)
    np.testing.assert_array_equal(regime.observe(labels), hcp_mlr_pl_draw(labels, 0.3))
    name = parse_config(["--label_proportion", "0.3", "--label_proportion_seed", "0", "--loss", "wan"]).exp_name
    assert name.startswith("synthetic_wan_prop0.3_seed0_s0_")


def test_the_seed_flag_alone_is_refused():
    with pytest.raises(SystemExit) as exc:
        parse_config(["--label_proportion_seed", "0"])
    assert exc.value.code == 2
