"""VLPL and AEVLP: the pseudo-label rules and every term of both losses, hand-computed; the scoring pass with a tiny
random CLIP (open_clip builds any model without weights) on a tiny VOC tree; the registry entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fixtures_raw import make_pascal
from PIL import Image

import clip_scores
import label_state
import losses
import losses_vlp
import methods_vlp
import registry
from config import parse_config

EPS5, EPS7 = 1e-5, 1e-7


def nl(x: float, eps: float = EPS5) -> float:
    return -math.log(x + eps)


def log_probs(*rows) -> torch.Tensor:
    """Similarities whose softmax at temperature 1 is exactly ``rows`` (each row sums to 1)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# ---------------------------------------------------------------------------------------------------------------------
# The rules.


def test_vlpl_rule_thresholds_the_softmax_and_marks_the_lowest_fraction_negative():
    sims = log_probs([0.6, 0.3, 0.1], [0.2, 0.45, 0.35])
    got = losses_vlp.vlpl_pseudo_labels(sims, temperature=1.0, threshold=0.4, negative_fraction=0.0)
    assert got.tolist() == [[1, 0, 0], [0, 1, 0]]
    got = losses_vlp.vlpl_pseudo_labels(sims, temperature=1.0, threshold=0.4, negative_fraction=0.34)  # 1 of 3
    assert got.tolist() == [[1, 0, -1], [-1, 1, 0]]


def test_vlpl_rule_divides_by_the_temperature():
    sims = torch.tensor([[0.30, 0.29, 0.20]])  # at T = 0.01: logits 30, 29, 20 -> 0.73, 0.27, 0.00003
    assert losses_vlp.vlpl_pseudo_labels(sims, temperature=0.01, threshold=0.5, negative_fraction=0).tolist() == [
        [1, 0, 0]
    ]
    assert losses_vlp.vlpl_pseudo_labels(sims, temperature=1.0, threshold=0.5, negative_fraction=0).tolist() == [
        [0, 0, 0]
    ]


def aevlp_case():
    """One image, 4 classes: the whole image and 2 crops, softmax values chosen by hand (temperature 1)."""
    whole = [0.40, 0.30, 0.20, 0.10]
    crop1 = [0.10, 0.70, 0.10, 0.10]
    crop2 = [0.50, 0.10, 0.30, 0.10]
    return log_probs(whole, crop1, crop2).unsqueeze(0), torch.tensor([[1, 0, 0, 0]])


def test_aevlp_rule_max_over_crops_above_the_gate():
    sims, observed = aevlp_case()
    # eta 0: every class's crop max beats min(0.40, 0) = 0, so the gate takes the max: (g + max) / 2 =
    # [0.45, 0.50, 0.25, 0.10]; top 2 = classes 1, 0, both >= 0.45
    got = losses_vlp.aevlp_pseudo_labels(
        sims, observed, temperature=1, threshold=0.45, top_k=2, eta=0, negative_ratio=0
    )
    assert got.tolist() == [[1, 1, 0, 0]]
    # the threshold cuts class 0 (0.45 < 0.46); top_k 1 keeps class 1 only
    got = losses_vlp.aevlp_pseudo_labels(
        sims, observed, temperature=1, threshold=0.46, top_k=2, eta=0, negative_ratio=0
    )
    assert got.tolist() == [[0, 1, 0, 0]]
    got = losses_vlp.aevlp_pseudo_labels(sims, observed, temperature=1, threshold=0.0, top_k=1, eta=0, negative_ratio=0)
    assert got.tolist() == [[0, 1, 0, 0]]


def test_aevlp_rule_min_over_crops_below_the_gate_and_negatives_from_the_mean():
    sims, observed = aevlp_case()
    # eta 0.6: the gate level is min(g at the observed positive = 0.40, 0.6) = 0.40; crop max > 0.40 for classes 0
    # (0.50) and 1 (0.70) only; classes 2, 3 take the min (0.10, 0.10): scores [0.45, 0.50, 0.15, 0.10]
    got = losses_vlp.aevlp_pseudo_labels(
        sims, observed, temperature=1, threshold=0.14, top_k=3, eta=0.6, negative_ratio=0
    )
    assert got.tolist() == [[1, 1, 1, 0]]
    got = losses_vlp.aevlp_pseudo_labels(
        sims, observed, temperature=1, threshold=0.16, top_k=3, eta=0.6, negative_ratio=0
    )
    assert got.tolist() == [[1, 1, 0, 0]]
    # negatives: (g + mean over crops) / 2 = [0.35, 0.35, 0.20, 0.10]; int(0.5 * 4) = 2 lowest: classes 3, 2
    got = losses_vlp.aevlp_pseudo_labels(sims, observed, temperature=1, threshold=0.14, top_k=3, eta=0.6,
                                         negative_ratio=0.5)  # fmt: skip
    assert got.tolist() == [[1, 1, -1, -1]]


def test_aevlp_rule_needs_crops():
    with pytest.raises(ValueError, match="grid"):
        losses_vlp.aevlp_pseudo_labels(torch.zeros(1, 1, 3), torch.zeros(1, 3), temperature=1, threshold=0.5,
                                       top_k=1, eta=0, negative_ratio=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The losses, one entry at a time (B = 1, C = 1: the mean is the entry's own loss).

P = 0.75
LOGIT = math.log(P / (1 - P))


def one(value: float) -> torch.Tensor:
    return torch.tensor([[value]])


def vlpl(observed: int, pseudo: int | None, alpha=0.2, beta_pos=0.7, beta_neg=0.3) -> float:
    pl = None if pseudo is None else torch.tensor([[pseudo]], dtype=torch.int8)
    return float(losses_vlp.vlpl_loss(one(LOGIT), torch.tensor([[observed]]), pl, alpha=alpha, beta_pos=beta_pos,
                                      beta_neg=beta_neg))  # fmt: skip


def test_vlpl_loss_terms():
    entropy = P * nl(P) + (1 - P) * nl(1 - P)
    assert vlpl(1, 0) == pytest.approx(nl(P), rel=1e-6)
    assert vlpl(1, -1) == pytest.approx(nl(P), rel=1e-6)  # the observed positive stays positive
    assert vlpl(0, 0) == pytest.approx(-0.2 * entropy, rel=1e-6)
    assert vlpl(0, 1) == pytest.approx(0.7 * (0.9 * nl(P) + 0.1 * nl(1 - P)), rel=1e-6)
    assert vlpl(0, -1) == pytest.approx(0.3 * (0.1 * nl(P) + 0.9 * nl(1 - P)), rel=1e-6)
    assert vlpl(0, None) == pytest.approx(-0.2 * entropy, rel=1e-6)  # the warm-up: plain EM
    assert vlpl(0, 1, beta_pos=0.0) == 0.0


def test_vlpl_loss_is_the_mean_over_all_entries():
    logits = torch.tensor([[LOGIT, 0.0], [0.0, LOGIT]])
    observed = torch.tensor([[1, 0], [0, 0]])
    pseudo = torch.tensor([[0, 1], [-1, 0]], dtype=torch.int8)
    got = losses_vlp.vlpl_loss(logits, observed, pseudo, alpha=0.1, beta_pos=0.7, beta_neg=0.0)
    h = P * nl(P) + (1 - P) * nl(1 - P)
    expected = (nl(P) + 0.7 * (0.9 * nl(0.5) + 0.1 * nl(0.5)) + 0.0 - 0.1 * h) / 4
    assert float(got) == pytest.approx(expected, rel=1e-6)


GR = dict(w=2.0, b=-2.0, q2=0.01, q3=1.0)


def aevlp(observed: int, pseudo: int, mu: float, sigma: float, lambda1=0.7, lambda2=0.4, rho=0.9) -> float:
    matrix = losses_vlp.aevlp_loss_matrix(one(LOGIT), torch.tensor([[observed]]), torch.tensor([[pseudo]]), mu=mu,
                                          sigma=sigma, lambda1=lambda1, lambda2=lambda2, rho=rho, **GR)  # fmt: skip
    return float(matrix[0, 0])


def test_aevlp_positive_pseudo_label_clamps_v_from_above_and_below():
    mixed = 0.9 * nl(P, EPS7) + 0.1 * nl(1 - P, EPS7)
    # mu = p: v = 1, clamped to 1 - lambda2 = 0.6: weight 1 - 0.6
    assert aevlp(0, 1, mu=P, sigma=1.0) == pytest.approx(0.4 * mixed, rel=1e-5)
    # v ~ 0 (p far from mu, narrow sigma), clamped to 1 - lambda1 = 0.3: weight 0.7
    assert aevlp(0, 1, mu=0.0, sigma=0.05) == pytest.approx(0.7 * mixed, rel=1e-5)
    # inside the interval v is kept: v = exp(-0.5 * (0.25 / 0.5)^2) = 0.8825 > 0.6 -> clamped; pick sigma for 0.5
    sigma = 0.25 / math.sqrt(2 * math.log(2))  # v = 0.5, inside [0.3, 0.6]
    assert aevlp(0, 1, mu=0.5, sigma=sigma) == pytest.approx(0.5 * mixed, rel=1e-5)
    assert aevlp(0, 1, mu=P, sigma=1.0, rho=1.0) == pytest.approx(0.4 * nl(P, EPS7), rel=1e-5)


def test_aevlp_negative_pseudo_label_is_v_weighted_bce():
    sigma = 0.25 / math.sqrt(2 * math.log(2))
    assert aevlp(0, -1, mu=0.5, sigma=sigma) == pytest.approx(0.5 * nl(1 - P, EPS7), rel=1e-5)
    assert aevlp(0, -1, mu=P, sigma=1.0) == pytest.approx(nl(1 - P, EPS7), rel=1e-5)  # v = 1: not clamped


def test_aevlp_other_entries_are_gr_loss():
    logits = torch.tensor([[LOGIT, -1.0, 0.3]])
    observed = torch.tensor([[1, 0, 1]])
    pseudo = torch.tensor([[0, 0, -1]])  # the observed positive keeps GR's -log p whatever its pseudo-label
    got = losses_vlp.aevlp_loss_matrix(logits, observed, pseudo, mu=0.5, sigma=1.0, lambda1=0.7, lambda2=0.4, rho=0.9,
                                       **GR)  # fmt: skip
    expected = losses.gr_loss_matrix(logits, observed, mu=0.5, sigma=1.0, **GR)
    assert torch.allclose(got, expected)


def test_aevlp_loss_adds_the_epr_regulariser_and_follows_gr_schedule():
    logits = torch.tensor([[LOGIT, 0.0], [0.0, 0.0]])
    observed = torch.tensor([[1, 0], [0, 1]])
    pseudo = torch.tensor([[0, 1], [-1, 0]])
    kw = dict(w=(0.0, 2.0), b=(-2.0, -2.0), mu=(0.5, 0.8), sigma=(2.0, 0.5), q2=0.01, q3=1.0, lambda1=0.7,
              lambda2=0.4, rho=0.9)  # fmt: skip
    base = losses_vlp.aevlp_loss(logits, observed, pseudo, epoch=3, num_epochs=8, reg=0.0, expected_num_pos=1.5, **kw)
    with_reg = losses_vlp.aevlp_loss(logits, observed, pseudo, epoch=3, num_epochs=8, reg=0.05, expected_num_pos=1.5,
                                     **kw)  # fmt: skip
    mean_positives = ((P + 0.5) + (0.5 + 0.5)) / 2
    assert float(with_reg - base) == pytest.approx(0.05 * (mean_positives - 1.5) ** 2 / 4, rel=1e-5)
    now = losses.gr_schedule(3, 8, w=kw["w"], b=kw["b"], mu=kw["mu"], sigma=kw["sigma"])
    matrix = losses_vlp.aevlp_loss_matrix(logits, observed, pseudo, w=now.w, b=now.b, mu=now.mu, sigma=now.sigma,
                                          q2=0.01, q3=1.0, lambda1=0.7, lambda2=0.4, rho=0.9)  # fmt: skip
    assert float(base) == pytest.approx(float(matrix.mean()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The registry entries.


def test_presets_name_each_papers_scorer_and_constants():
    cfg = parse_config(["--dataset", "coco", "--loss", "aevlp", "--exp_name", "x"])
    got = (cfg.vlp_clip, cfg.vlp_grid, cfg.gr_w, cfg.gr_b, cfg.aevlp_lambda)
    assert got == ("ViT-B-16", 4, (0.0, 10.0), (-2.0, -8.0), (0.7, 0.5))
    cfg = parse_config(["--dataset", "cub", "--loss", "aevlp", "--exp_name", "x"])
    assert (cfg.vlp_grid, cfg.aevlp_top_k, cfg.vlp_temperature, cfg.gr_q3) == (5, 32, 0.1, 1.5)
    cfg = parse_config(["--dataset", "pascal", "--loss", "vlpl", "--exp_name", "x"])
    assert (cfg.vlp_clip, cfg.vlp_grid, cfg.vlp_threshold, cfg.em_alpha) == ("ViT-L-14-336", 0, 0.3, 0.2)
    assert registry.paper_number("aevlp", "end_to_end", "coco") == 73.54
    assert registry.paper_number("vlpl", "end_to_end", "cub") == 24.02


def test_aevlp_refuses_torchrun_and_real_data_refuses_the_stand_in():
    cfg = parse_config(["--loss", "aevlp", "--exp_name", "x"])
    assert "EPR regulariser" in registry.single_process_reason(cfg)
    assert registry.single_process_reason(parse_config(["--loss", "vlpl", "--exp_name", "x"])) is None
    with pytest.raises(SystemExit):
        parse_config(["--dataset", "coco", "--loss", "vlpl", "--vlp_clip", "standin", "--exp_name", "x"])


def test_the_flip_picks_the_pseudo_labels_of_the_view_trained_on():
    state = label_state.LabelState(observed=None)
    table = torch.tensor([[[1, 0], [0, 1]], [[-1, 0], [0, -1]]], dtype=torch.int8)  # image x flip x class
    state.extra["vlp_pseudo"] = table
    b = registry.LossInputs(None, None, None, torch.tensor([1, 0]), state, 0.0, 1, None, None,
                           torch.tensor([True, False]))  # fmt: skip
    assert methods_vlp._vlp_batch_pseudo(b).tolist() == [[0, -1], [1, 0]]
    assert methods_vlp._vlp_batch_pseudo(b._replace(flip=None)).tolist() == [[-1, 0], [1, 0]]


# ---------------------------------------------------------------------------------------------------------------------
# The scoring pass, with a tiny random CLIP on a tiny VOC tree.

TINY = "tiny-test-clip"


@pytest.fixture
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    factory._MODEL_CONFIGS[TINY] = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    yield open_clip
    factory._MODEL_CONFIGS.pop(TINY, None)


def score(root, **kw):
    torch.manual_seed(0)  # the random weights of the tiny CLIP, the same on every load
    rules = methods_vlp.pseudo_label_rules("pascal", 2)  # what pseudo_labels.py reports on
    return clip_scores.ensure_scores("pascal", root, root, TINY, 2, weights=None, batch=7, rules=rules, **kw)


def test_views_flip_the_image_and_mirror_the_grid():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    views = clip_scores.image_views(Image.fromarray(pixels), grid=2, size=4)
    assert views.shape == (2, 5, 4, 4, 3)
    mirrored = clip_scores.image_views(Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])), grid=2, size=4)[0]
    assert np.array_equal(views[1], mirrored)  # the flipped image's own views, in its own grid order


def test_scoring_pass_writes_resumes_reuses_and_refuses(tiny_clip, tmp_path, monkeypatch):
    root = make_pascal(tmp_path / "pascal")
    monkeypatch.setattr(clip_scores, "CHUNK", 1)
    path = score(root)
    scores = np.load(path)
    meta = clip_scores.read_meta(path)
    assert scores.shape == (meta["num_images"], 2, 5, 20) and np.isfinite(scores).all()
    assert meta["complete"] and set(meta["quality"]) == {"vlpl", "aevlp"} and meta["bytes_per_image_and_class"] == 20
    assert meta["prompts"][0] == "a photo of a aeroplane."

    chunks = []
    assert score(root, on_chunk=chunks.append) == path and chunks == []  # reused: nothing scored again

    path.unlink()  # a pass killed after its first image resumes from there, with the same scores
    meta_file = clip_scores.meta_path(path)
    meta_file.unlink()

    def stop(done):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score(root, on_chunk=stop)
    assert clip_scores._read_done(path, len(scores)).sum() == 1
    resumed = []
    score(root, on_chunk=resumed.append)
    assert resumed[0] == 2 and np.array_equal(np.load(path), scores)

    with pytest.raises(clip_scores.ScoreError, match="prompts"):  # other prompts: refused, the file kept
        score(root, template="{}")
    score(root, template="{}", overwrite=True)
    assert clip_scores.read_meta(path)["prompts"][0] == "aeroplane"


def test_a_run_without_its_score_file_names_the_command(tmp_path):
    path = tmp_path / "missing.npy"
    with pytest.raises(clip_scores.ScoreError, match="python pseudo_labels.py --dataset coco --clip ViT-B-16"):
        clip_scores.open_scores(path, 3, 80, 4, clip_scores.make_command("coco", "ViT-B-16", 4))


def test_other_images_get_another_file():
    a = clip_scores.score_path(tmp := __import__("pathlib").Path("d"), "ViT-B-16", 4, np.array(["a.jpg", "b.jpg"]))
    assert a != clip_scores.score_path(tmp, "ViT-B-16", 4, np.array(["a.jpg", "c.jpg"]))
    assert a != clip_scores.score_path(tmp, "ViT-L-14-336", 4, np.array(["a.jpg", "b.jpg"]))


def test_without_open_clip_the_message_gives_the_pip_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name == "open_clip":
            raise ImportError("no module named open_clip")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(clip_scores.ScoreError, match="pip install open-clip-torch"):
        clip_scores.load_clip("ViT-B-16", None, torch.device("cpu"))


def test_standin_reaches_about_eighty_percent_precision(synthetic_root):
    import datasets

    data = datasets.load_formatted("synthetic", synthetic_root)["train"]
    scores = clip_scores.standin_similarities(data["labels"], 4)
    rules = methods_vlp.pseudo_label_rules("synthetic", 4)
    assert set(rules) == {"vlpl", "aevlp"}
    for name, rule in rules.items():
        q = clip_scores.quality(scores, data["labels"], data["labels_obs"], rule)
        assert 0.7 < q["precision"] < 0.9 and q["recall"] > 0.2, (name, q)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["vlpl", "aevlp"])
def test_runs_on_the_synthetic_default_with_no_other_step_and_resume(synthetic_root, tmp_path, loss):
    from conftest import read_run, run_main

    args = ["--data_root", str(synthetic_root), "--loss", loss, "--num_epochs", "2", "--ss_frac_train", "0.05",
            "--ss_frac_val", "0.1", "--save_path", str(tmp_path), "--exp_name", loss]  # fmt: skip
    run_main(*args)
    config, log, final = read_run(tmp_path / loss)
    assert config["vlp_clip"] == "standin" and len(log) == 2 and final["test_map"] > 0
