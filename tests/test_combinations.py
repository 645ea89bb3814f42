"""Every combination the command line accepts runs, or is refused before training with a message: method (loss x
scheme) x training mode x dataset x label regime x variant x modifier x single process / torchrun.

How the cross-product is walked, to stay fast on 2 cores:
- every combination's config is resolved and validated (``config_from_args``, as ``main.py`` does before anything is
  loaded); a refusal must be a ``ValueError`` whose message names a flag. Under torchrun the trainer refuses the
  single-process methods before training (``registry.single_process_reason``), checked for every accepted one;
- the dataset and the label regime change only the constants and which labels are observed, not the code a training
  step runs; so one or two steps run for each distinct (variant, loss, scheme, modifier, mode) on synthetic-sized
  tensors in this process: end to end, two epochs of the configured loss with the scheme's rate, the label
  corrections and the per-epoch hooks; LinearInit, its frozen-feature phase (``linear_init.train_linear_head``, where
  ``--loss gr --train_mode linear_init`` used to fail) on random features. Images, loaders and torchrun's collectives
  are covered by tests/test_train.py and tests/test_distributed.py.
"""

import dataclasses
import itertools
import types

import numpy as np
import pytest
import torch
from conftest import BUILT_IN_DATASETS, run_main

import config
import linear_init
import methods_vlp
import models
import registry
import trainstep

REGIMES = {"single positive": [], "2 positives, 1 negative": ["--num_pos", "2", "--num_neg", "1"],
           "30% of the labels": ["--label_proportion", "0.3"]}  # fmt: skip
MODIFIERS = {"none": [], "boostlu": ["--boostlu_alpha", "5"]}


def cross_product() -> list[tuple[str, list[str]]]:
    """(a name, the command line) of every combination."""
    out = []
    for variant, loss, scheme, mode, dataset, (regime, regime_flags), (modifier, modifier_flags) in itertools.product(
        registry.names(registry.VARIANT), registry.names(registry.LOSS), registry.names(registry.SCHEME),
        registry.names(registry.MODE), config.dataset_names(), REGIMES.items(), MODIFIERS.items(),
    ):  # fmt: skip
        argv = ["--dataset", dataset, "--train_set_variant", variant, "--loss", loss, "--mod_scheme", scheme,
                "--train_mode", mode, *regime_flags, *modifier_flags, "--exp_name", "x"]  # fmt: skip
        out.append((f"{dataset} {variant} {loss} {scheme} {mode} {regime} {modifier}", argv))
    return out


def resolve(parser, argv):
    """The config of a command line, or the message that refuses it."""
    try:
        return config.config_from_args(parser.parse_args(argv)), None
    except ValueError as err:
        return None, str(err)


def test_every_combination_is_accepted_or_refused_with_a_message():
    parser = config.get_args_parser()
    accepted, refused, torchrun_refused = [], [], []
    for name, argv in cross_product():
        cfg, message = resolve(parser, argv)
        if cfg is None:
            assert message and "--" in message, name  # a sentence that names the flag to change
            refused.append(name)
            continue
        accepted.append(name)
        reason = registry.single_process_reason(cfg)
        if reason is not None:
            assert "Start it without torchrun" in reason, name
            torchrun_refused.append(name)
    total = len(accepted) + len(refused)
    assert total == len(cross_product())
    print(f"\n{total} combinations x 2 (single process, torchrun): {len(accepted)} accepted and "
          f"{len(accepted) - len(torchrun_refused)} under torchrun; refused: {len(refused)} by the command line, "
          f"{len(torchrun_refused)} more under torchrun")  # fmt: skip
    # the built-in table's rows are among the accepted ones, on every built-in dataset they are offered on
    assert any(n.startswith("coco observed an LL-R end_to_end single positive boostlu") for n in accepted)
    assert "coco observed gr AN linear_init single positive none" in accepted
    assert "openimages clean an AN end_to_end single positive none" not in accepted
    assert set(BUILT_IN_DATASETS) <= {n.split()[0] for n in accepted}


def distinct_code_paths() -> list[config.Config]:
    """One accepted config per (variant, loss, scheme, modifier, mode), on synthetic with the default regime."""
    parser = config.get_args_parser()
    out = []
    for name, argv in cross_product():
        dataset, _variant, _loss, _scheme, _mode, *rest = name.split()
        if dataset == "synthetic" and " ".join(rest[:-1]) == "single positive":
            cfg, _ = resolve(parser, [*argv, "--num_epochs", "2", "--apl_warmup", "1", "--linear_epochs", "1",
                                      "--bsize", "4"])  # fmt: skip
            if cfg is not None:
                out.append(cfg)
    return out


PATHS = distinct_code_paths()


def fake_split(num_images: int, num_classes: int, seed: int = 0):
    """Full labels with at least one positive per image, and one observed positive each (the paper's regime)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((num_images, num_classes)) < 0.3).astype(np.float32)
    labels[np.arange(num_images), rng.integers(0, num_classes, num_images)] = 1
    observed = np.zeros((num_images, num_classes), dtype=np.int8)
    for row in range(num_images):
        observed[row, rng.choice(np.flatnonzero(labels[row]))] = 1
    return types.SimpleNamespace(labels=labels, observed=observed)


def with_clean_labels(cfg, split):
    """The clean variant trains on the full labels (what datasets.load_data gives it)."""
    if cfg.train_set_variant == "clean":
        split.observed = split.labels.astype(np.int8)
    return split


def fake_pseudo_labels(cfg, state) -> None:
    """What the CLIP pseudo-label methods' init_state puts in the state, without a score file on disk: -1/0/1 per
    image, flip and class (tests/test_vlp.py runs the real scoring pass and rules)."""
    generator = torch.Generator().manual_seed(1)
    shape = (state.observed.matrix.shape[0], 2, state.observed.matrix.shape[1])
    state.extra["vlp_pseudo"] = torch.randint(-1, 2, shape, generator=generator, dtype=torch.int8)
    state.extra["vlp_score_file"] = "fake"


@pytest.mark.parametrize("cfg", PATHS, ids=lambda c: registry.row_of(c) + "_" + c.train_mode)
def test_each_distinct_code_path_trains_a_step(cfg, monkeypatch):
    torch.manual_seed(0)
    num_images, num_classes, feat = 12, 16, 8
    for method in registry.active(cfg):
        if method.init_state is methods_vlp._vlp_init:  # reads a score file of a real data root
            monkeypatch.setitem(
                registry.REGISTRY, method.name, dataclasses.replace(method, init_state=fake_pseudo_labels)
            )
    split = with_clean_labels(cfg, fake_split(num_images, num_classes))
    state = registry.build_label_state(cfg, split, torch.device("cpu"))
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, feat, 3, padding=1))
    model = models.MultiLabelClassifier(backbone, feat, num_classes, "avg", **registry.model_options(cfg))
    if cfg.train_mode == "linear_init":
        feats = torch.randn(num_images, feat)
        epochs_ended = []  # the trainer's callback after each linear epoch (where it stops on a SIGINT)
        best = linear_init.train_linear_head(
            cfg, model, state, feats, feats[:4], None, lambda s, _: 50.0, lambda r: None, lambda: epochs_ended.append(1)
        )
        assert best["epoch"] == 1 and len(epochs_ended) == cfg.linear_epochs
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}, *registry.extra_param_groups(cfg, state)]
    optimizer = trainstep.make_optimizer(cfg, groups)
    images = torch.randn(num_images, 3, 4, 4)
    for epoch in (1, 2):
        rate = registry.modification_rate(cfg, epoch)
        for rows in torch.arange(num_images).split(cfg.bsize):
            loss, selected = registry.compute_loss(cfg, model(images[rows]), state.observed.batch(rows), rows, rate,
                                                  state, epoch=epoch)  # fmt: skip
            assert torch.isfinite(loss), (registry.row_of(cfg), epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if registry.corrects_labels(cfg):
                state.observed.correct(rows, selected)
        with torch.no_grad():
            registry.after_epoch(cfg, state, epoch, lambda: torch.sigmoid(model(images)))


def test_the_distinct_code_paths_cover_every_entry():
    used = {m.name for cfg in PATHS for m in registry.active(cfg)}
    assert used == set(registry.REGISTRY)
    print(f"\n{len(PATHS)} distinct code paths trained")


@pytest.mark.slow  # generates the synthetic data and trains
def test_gr_loss_with_linear_init_runs_end_to_end(synthetic_root, tmp_path):
    """The combination that once passed validation and ended in a traceback (the linear phase had no epoch)."""
    proc = run_main("--loss", "gr", "--train_mode", "linear_init", "--linear_epochs", "1", "--num_epochs", "2",
                    "--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "gr_li",
                    "--ss_frac_train", "0.05", "--ss_frac_val", "0.05", "--num_workers", "0", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
