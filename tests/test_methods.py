"""The trainer's per-method pieces: diagnostics, BoostLU's head, ROLE's estimator, LinearInit's phase."""

import math
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import methods
import models
import train
from config import parse_config


def test_diagnostics_match_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.0], [1.0, 3.0, -2.0]])
    initial = torch.tensor([[1, 0, 0], [0, 0, 0]])
    clean = torch.tensor([[True, True, False], [False, True, False]])
    selected = torch.tensor([[False, True, False], [True, False, False]])
    d = methods.Diagnostics(torch.device("cpu"))
    d.update(logits, initial, clean, selected)
    s = d.summary()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    # false negatives (unobserved, truly positive): (0,1) z=-1 and (1,1) z=3
    assert s["fn_prob"] == pytest.approx((sig(-1) + sig(3)) / 2)
    assert s["fn_loss"] == pytest.approx((softplus(-1) + softplus(3)) / 2)
    # true negatives: (0,2) z=0, (1,0) z=1, (1,2) z=-2
    assert s["tn_prob"] == pytest.approx((sig(0) + sig(1) + sig(-2)) / 3)
    assert s["tn_loss"] == pytest.approx((softplus(0) + softplus(1) + softplus(-2)) / 3)
    assert s["selected_precision"] == pytest.approx(0.5)  # (0,1) truly positive, (1,0) not


def test_diagnostics_without_candidates_report_none():
    d = methods.Diagnostics(torch.device("cpu"))
    d.update(torch.zeros(1, 2), torch.tensor([[1, -1]]), torch.tensor([[True, False]]), torch.zeros(1, 2, dtype=bool))
    assert d.summary() == {k: None for k in ("fn_loss", "tn_loss", "fn_prob", "tn_prob", "selected_precision")}


class Identity(nn.Module):
    def forward(self, x):
        return x


def test_boostlu_head_is_the_cam_form_with_positive_values_boosted():
    torch.manual_seed(0)
    fmap = torch.randn(2, 4, 3, 3)  # B x D x h x w: the "backbone" passes it through
    plain = models.MultiLabelClassifier(Identity(), 4, 5)
    boosted = models.MultiLabelClassifier(Identity(), 4, 5, boostlu_alpha=5.0)
    boosted.load_state_dict(plain.state_dict())
    cam = plain.class_activation_map(fmap)
    assert cam.shape == (2, 5, 3, 3)
    manual = torch.einsum("bdhw,cd->bchw", fmap, plain.head.weight) + plain.head.bias[None, :, None, None]
    assert torch.allclose(cam, manual, atol=1e-6)
    assert torch.allclose(boosted(fmap), torch.where(manual > 0, 5 * manual, manual).mean((2, 3)), atol=1e-6)
    # alpha 1 is the plain model: GAP then the linear head equals the mean of the CAM
    identity = models.MultiLabelClassifier(Identity(), 4, 5, boostlu_alpha=1.0)
    identity.load_state_dict(plain.state_dict())
    assert torch.allclose(identity(fmap), plain(fmap), atol=1e-6)


def test_label_estimator_starts_from_the_observed_labels():
    observed = torch.tensor([[1, 0, -1], [0, 0, 1]])
    q = models.LabelEstimator(observed, torch.Generator().manual_seed(0))(torch.tensor([0, 1])).detach()
    assert q[0, 0] == pytest.approx(0.995) and q[1, 2] == pytest.approx(0.995) and q[0, 2] == pytest.approx(0.005)
    unobserved = q[observed == 0]
    assert ((unobserved > 0.4) & (unobserved < 0.6)).all()


def tiny_cfg(synthetic_root, tmp_path, *extra):
    return parse_config(
        [
            "--data_root",
            str(synthetic_root),
            "--save_path",
            str(tmp_path),
            "--exp_name",
            "x",
            "--ss_frac_train",
            "0.05",
            "--ss_frac_val",
            "0.1",
            "--num_workers",
            "0",
            *extra,
        ]  # fmt: skip
    )


def test_linear_init_caches_features_once_and_leaves_the_best_head(synthetic_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(synthetic_root, tmp_path, "--train_mode", "linear_init", "--linear_epochs", "4")
    shutil.rmtree(synthetic_root / "features", ignore_errors=True)  # the feature cache starts empty
    data = datasets.build_data(cfg)
    torch.manual_seed(0)
    model = train.build_model(cfg, 16)
    state = methods.build_label_state(cfg, data.train, torch.device("cpu"))
    records = []
    session = types.SimpleNamespace(
        cfg=cfg,
        model=model,
        data=data,
        state=state,
        device=torch.device("cpu"),
        ctx=train.SINGLE,
        log=records.append,
        stop=train.StopRequest(),
    )
    train.linear_init(session)
    cache = list((synthetic_root / "features").glob("*.npy"))
    assert len(cache) == 2  # train and val features
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and all(r["phase"] == "linear" for r in records)
    # The second phase starts from the best linear head: it scores val exactly as the best logged epoch did.
    val_feats = methods.cached_features(cfg, model, data.val, torch.device("cpu"))
    with torch.no_grad():
        val_map = train._scores_map(torch.sigmoid(model.head(val_feats)), train.eval_labels(data.val, "cpu"))
    assert val_map == pytest.approx(max(r["val_map"] for r in records), abs=1e-9)
    # A second LinearInit run reads the cache: the backbone is never called.
    monkeypatch.setattr(model.backbone, "forward", lambda x: pytest.fail("features were recomputed"))
    again = methods.cached_features(cfg, model, data.train, torch.device("cpu"))
    assert again.shape == (len(data.train), models.SmallCNN.out_channels)
    np.testing.assert_array_equal(again.numpy(), np.load(methods.feature_cache_path(cfg, data.train)))


def test_apl_state_and_quota(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, "--loss", "em_apl", "--num_epochs", "10", "--apl_warmup", "5")
    data = datasets.build_data(cfg)
    state = methods.build_label_state(cfg, data.train, torch.device("cpu"))
    unobserved = (torch.from_numpy(data.train.observed) == 0).sum(0)
    assert torch.equal(state.apl_quota, (0.9 * unobserved.double() / 5).floor().long())
    scores = torch.rand(len(data.train), 16, generator=torch.Generator().manual_seed(0))
    labelled = methods.pseudo_label_negatives(scores, state)
    assert labelled == int(state.apl_quota.sum()) and int(state.pseudo_negative.sum()) == labelled
    assert torch.equal(state.soft_label[state.pseudo_negative], scores[state.pseudo_negative])
    assert (state.observed.matrix[state.pseudo_negative] == 0).all()


def test_role_estimator_is_trained_and_checkpointed(synthetic_root, tmp_path):
    from conftest import run_cli

    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "role", "--loss", "role",
            "--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--num_epochs", "2", "--num_workers", "0"]  # fmt: skip
    run_cli(*args)
    checkpoint = torch.load(tmp_path / "role" / "bestmodel.pt", weights_only=True)
    estimator = checkpoint["estimator"]["logits"]
    assert estimator.shape == (200, 16)
    initial_bound = math.log(0.6 / 0.4)
    observed_pos = math.log(0.995 / 0.005)
    moved = (estimator.abs() > initial_bound + 1e-3) & ((estimator - observed_pos).abs() > 1e-3)
    assert moved.any()  # trained jointly: some logits left their initial ranges


def test_compute_loss_dispatches_every_baseline(synthetic_root, tmp_path):
    for loss in ("an", "wan", "lsan", "epr", "role", "em", "em_apl"):
        cfg = tiny_cfg(synthetic_root, tmp_path, "--loss", loss)
        data = datasets.build_data(cfg)
        state = methods.build_label_state(cfg, data.train, torch.device("cpu"))
        idx = torch.arange(4)
        logits = torch.randn(4, 16, requires_grad=True)
        value, selected = methods.compute_loss(cfg, logits, state.observed.batch(idx), idx, 0.0, state)
        value.backward()
        assert torch.isfinite(value) and not selected.any() and logits.grad is not None, loss
    assert F.softplus(torch.tensor(0.0)) == pytest.approx(math.log(2))
