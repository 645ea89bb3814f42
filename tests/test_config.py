"""The command line: presets, recorded provenance, and clear errors for bad values."""

import pytest

from config import PRESETS, parse_config


def test_defaults_are_the_synthetic_demo_with_presets_recorded():
    cfg = parse_config(["--exp_name", "x"])
    assert (cfg.dataset, cfg.mod_scheme, cfg.arch, cfg.delta_rel) == ("synthetic", "LL-R", "smallcnn", 1.0)
    assert set(cfg.from_preset) == {"arch", "image_size", "num_epochs", "optimizer", "lr", "delta_rel",
                                    "expected_num_pos", "em_alpha", "apl_beta", "apl_warmup"}  # fmt: skip


@pytest.mark.parametrize("dataset", ["pascal", "coco", "nuswide", "cub"])
@pytest.mark.parametrize("scheme", ["LL-R", "LL-Ct", "LL-Cp"])
def test_published_best_settings_are_the_presets(dataset, scheme):
    cfg = parse_config(["--dataset", dataset, "--mod_scheme", scheme, "--exp_name", "x"])
    preset = PRESETS[dataset]
    assert (cfg.optimizer, cfg.lr, cfg.delta_rel) == (preset["optimizer"], preset["lr"], preset["delta_rel"][scheme])
    assert (cfg.arch, cfg.image_size, cfg.num_epochs, cfg.bsize) == ("resnet50", 448, 10, 16)


def test_paper_table_values_for_coco_and_voc():
    coco = parse_config(["--dataset", "coco", "--mod_scheme", "LL-R", "--exp_name", "x"])
    assert (coco.optimizer, coco.lr, coco.delta_rel) == ("adam", 1e-5, 0.4)
    voc = parse_config(["--dataset", "pascal", "--mod_scheme", "LL-Cp", "--exp_name", "x"])
    assert (voc.optimizer, voc.lr, voc.delta_rel) == ("sgd", 5e-3, 0.1)


def test_explicit_values_are_not_marked_as_preset():
    cfg = parse_config(["--dataset", "coco", "--lr", "2e-5", "--delta_rel", "0.3", "--exp_name", "x"])
    assert cfg.lr == 2e-5 and cfg.delta_rel == 0.3
    assert "lr" not in cfg.from_preset and "delta_rel" not in cfg.from_preset and "optimizer" in cfg.from_preset


def test_clean_labels_default_to_plain_bce():
    cfg = parse_config(["--train_set_variant", "clean", "--exp_name", "x"])
    assert cfg.mod_scheme == "AN" and cfg.delta_rel == 0.0


def test_config_is_frozen():
    cfg = parse_config(["--exp_name", "x"])
    with pytest.raises(AttributeError):
        cfg.lr = 1.0


def test_default_exp_name_names_the_run():
    cfg = parse_config(["--dataset", "coco", "--mod_scheme", "LL-Ct", "--seed", "3"])
    assert cfg.exp_name.startswith("coco_LL-Ct_d0.2_s3_")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagenet"], "invalid choice"),
        (["--mod_scheme", "LL-X"], "invalid choice"),
        (["--delta_rel", "-0.1"], "delta_rel"),
        (["--delta_rel", "250"], "delta_rel"),
        (["--bsize", "0"], "bsize"),
        (["--num_epochs", "-1"], "num_epochs"),
        (["--lr", "0"], "lr"),
        (["--val_frac", "1.5"], "val_frac"),
        (["--ss_frac_train", "0"], "ss_frac_train"),
        (["--use_pretrained", "maybe"], "boolean"),
        (["--train_set_variant", "clean", "--mod_scheme", "LL-R"], "clean"),
        (["--mod_scheme", "LL-Cp", "--delta_rel", "0"], "LL-Cp"),
        (["--exp_name", "a/b"], "exp_name"),
    ],
)
def test_bad_values_exit_with_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err
