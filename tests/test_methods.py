"""The trainer's per-method pieces: diagnostics, BoostLU's head, ROLE's estimator, LinearInit's phase, and the loss
dispatch through the method registry."""

import math
import shutil
import types

import numpy as np
import pytest
import torch
from torch import nn

import datasets
import diagnostics
import distributed
import evaluation
import linear_init
import losses
import methods
import models
import registry
import train
from config import parse_config


def test_diagnostics_match_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.0], [1.0, 3.0, -2.0]])
    initial = torch.tensor([[1, 0, 0], [0, 0, 0]])
    clean = torch.tensor([[True, True, False], [False, True, False]])
    selected = torch.tensor([[False, True, False], [True, False, False]])
    d = diagnostics.Diagnostics(torch.device("cpu"))
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
    d = diagnostics.Diagnostics(torch.device("cpu"))
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


@pytest.mark.slow
def test_linear_init_caches_features_once_and_leaves_the_best_head(synthetic_root, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(synthetic_root, tmp_path, "--train_mode", "linear_init", "--linear_epochs", "4")
    shutil.rmtree(synthetic_root / "features", ignore_errors=True)  # the feature cache starts empty
    data = datasets.build_data(cfg)
    torch.manual_seed(0)
    model = train.build_model(cfg, 16)
    state = registry.build_label_state(cfg, data.train, torch.device("cpu"))
    records = []
    session = types.SimpleNamespace(
        cfg=cfg,
        model=model,
        data=data,
        state=state,
        device=torch.device("cpu"),
        ctx=distributed.SINGLE,
        log=records.append,
        stop=train.StopRequest(),
    )
    val_labels = evaluation.eval_labels(data.val, "cpu")
    assert [m.name for m in registry.before_training_hooks(cfg)] == ["linear_init"]
    registry.before_training(session, lambda scores: train._scores_map(scores, val_labels))
    cache = list((synthetic_root / "features").glob("*.npy"))
    assert len(cache) == 2  # train and val features
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and all(r["phase"] == "linear" for r in records)
    # The second phase starts from the best linear head: it scores val exactly as the best logged epoch did.
    val_feats = linear_init.cached_features(cfg, model, data.val, torch.device("cpu"))
    with torch.no_grad():
        val_map = train._scores_map(torch.sigmoid(model.head(val_feats)), val_labels)
    assert val_map == pytest.approx(max(r["val_map"] for r in records), abs=1e-9)
    # A cache file that cannot be used (cut short, another shape, NaN) is computed again, to the same features.
    path = linear_init.feature_cache_path(cfg, data.train)
    good = np.load(path)
    for damaged in (path.read_bytes()[:100], None, np.full_like(good, np.nan)):
        if damaged is None:
            np.save(path, good[:, :3])
        elif isinstance(damaged, bytes):
            path.write_bytes(damaged)
        else:
            np.save(path, damaged)
        capsys.readouterr()
        np.testing.assert_array_equal(linear_init.cached_features(cfg, model, data.train, torch.device("cpu")), good)
        assert "computing them again" in capsys.readouterr().out
        np.testing.assert_array_equal(np.load(path), good)
    # A second LinearInit run reads the cache: the backbone is never called.
    monkeypatch.setattr(model.backbone, "forward", lambda x: pytest.fail("features were recomputed"))
    again = linear_init.cached_features(cfg, model, data.train, torch.device("cpu"))
    assert again.shape == (len(data.train), models.SmallCNN.out_channels)
    np.testing.assert_array_equal(again.numpy(), np.load(linear_init.feature_cache_path(cfg, data.train)))


def test_apl_state_and_quota(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, "--loss", "em_apl", "--num_epochs", "10", "--apl_warmup", "5")
    data = datasets.build_data(cfg)
    state = registry.build_label_state(cfg, data.train, torch.device("cpu"))
    unobserved = (torch.from_numpy(data.train.observed) == 0).sum(0)
    quota, pseudo = state.extra["apl_quota"], state.extra["pseudo_negative"]
    assert torch.equal(quota, (0.9 * unobserved.double() / 5).floor().long())
    scores = torch.rand(len(data.train), 16, generator=torch.Generator().manual_seed(0))
    # the registry's per-epoch hook: nothing before the warm-up epoch, a round of labels from it on
    assert registry.after_epoch(cfg, state, 4, lambda: pytest.fail("scored before the warm-up")) == {}
    labelled = registry.after_epoch(cfg, state, 5, lambda: scores)["pseudo_labelled"]
    assert labelled == int(quota.sum()) and int(pseudo.sum()) == labelled
    assert torch.equal(state.extra["soft_label"][pseudo], scores[pseudo])
    assert (state.observed.matrix[pseudo] == 0).all()
    assert registry.after_epoch(cfg, state, 10, lambda: pytest.fail("labels after the last epoch")) == {}
    # the pseudo-labels are checkpointed and restored
    saved = state.checkpoint()
    fresh = registry.build_label_state(cfg, data.train, torch.device("cpu"))
    fresh.restore(saved)
    assert torch.equal(fresh.extra["pseudo_negative"], pseudo) and torch.equal(fresh.extra["soft_label"],
                                                                                state.extra["soft_label"])  # fmt: skip


@pytest.mark.slow
def test_role_estimator_is_trained_and_checkpointed(synthetic_root, tmp_path):
    from conftest import run_main

    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "role", "--loss", "role",
            "--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--num_epochs", "2", "--num_workers", "0"]  # fmt: skip
    run_main(*args)
    checkpoint = torch.load(tmp_path / "role" / "bestmodel.pt", weights_only=True)
    estimator = checkpoint["estimator"]["logits"]
    assert estimator.shape == (200, 16)
    initial_bound = math.log(0.6 / 0.4)
    observed_pos = math.log(0.995 / 0.005)
    moved = (estimator.abs() > initial_bound + 1e-3) & ((estimator - observed_pos).abs() > 1e-3)
    assert moved.any()  # trained jointly: some logits left their initial ranges


def expected_loss(loss, logits, observed, idx, state):
    """The function of losses.py each --loss must reach, with the synthetic presets' constants."""
    if loss == "an":
        return losses.large_loss(logits, observed, "LL-R", 0.4)[0]
    if loss == "wan":
        return losses.wan_loss(logits, observed)
    if loss == "lsan":
        return losses.lsan_loss(logits, observed, 0.1)
    if loss == "epr":
        return losses.epr_loss(logits, observed, 2.5)
    if loss == "role":
        return losses.role_loss(logits, observed, state.extra["estimator"](idx), 2.5)
    if loss == "em":
        return losses.em_loss(logits, observed, 0.1)
    pseudo, soft = state.extra["pseudo_negative"][idx], state.extra["soft_label"][idx]
    return losses.em_loss(logits, observed, 0.1, pseudo_negative=pseudo, soft_label=soft, beta=0.2)


def test_compute_loss_dispatches_every_baseline_to_its_own_loss(synthetic_root, tmp_path):
    """Each --loss reaches its own function in losses.py with its own constants (and AN's loss its scheme, LL-R)."""
    idx = torch.arange(4)
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    values = {}
    for loss in ("an", "wan", "lsan", "epr", "role", "em", "em_apl"):
        cfg = tiny_cfg(synthetic_root, tmp_path, "--loss", loss)
        data = datasets.build_data(cfg)
        state = registry.build_label_state(cfg, data.train, torch.device("cpu"))
        observed = state.observed.batch(idx)
        if loss == "em_apl":  # some pseudo-labels, so that the APL term counts
            methods.pseudo_label_negatives(torch.rand(len(data.train), 16), state)
        z = logits.clone().requires_grad_(True)
        value, selected = registry.compute_loss(cfg, z, observed, idx, 0.4, state)
        value.backward()
        assert z.grad is not None and z.grad.abs().sum() > 0, loss
        assert value.item() == pytest.approx(expected_loss(loss, logits, observed, idx, state).item(), rel=1e-6), loss
        if loss == "an":  # LL-R at rate 0.4 rejects ceil(4 * 16 * 0.4) = 26 unobserved entries
            assert int(selected.sum()) == 26 and not (selected & (observed != 0)).any()
        else:
            assert not selected.any(), loss
        values[loss] = round(value.item(), 6)
    assert len(set(values.values())) == len(values)  # no two losses fall through to the same code


def test_feature_cache_goes_to_cache_dir(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, "--cache_dir", str(tmp_path / "cache"))
    data = datasets.build_data(cfg)
    path = linear_init.feature_cache_path(cfg, data.train)
    assert path.is_relative_to(tmp_path / "cache") and path.parent.name == "features"
    plain = linear_init.feature_cache_path(tiny_cfg(synthetic_root, tmp_path), data.train)
    assert plain.parent == synthetic_root / "features" and plain.name == path.name
