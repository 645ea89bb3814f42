"""The command line: presets against the published values, recorded provenance, the partial-label regimes, the
registry listing, and clean errors for bad values."""

import dataclasses
import json

import pytest
from conftest import BUILT_IN_DATASETS, BUILT_IN_ROWS

import config
import datasets
from config import parse_config

# The published settings, written out here by hand from their sources (not read from the code):
# - optimiser, lr, delta_rel per LL scheme: the best settings the LL authors posted (official repository, issue #4);
#   OpenImages has none published: COCO's are its preset;
# - BoostLU's delta_rel (its paper and code): LL-R 0.5, LL-Ct 0.2, LL-Cp 0.1;
# - expected positives for EPR/ROLE: Cole et al.'s paper (VOC 1.5, COCO 2.9, NUS-WIDE 1.9, CUB 31.4);
# - EM alpha, APL beta and warm-up: Zhou et al.'s released defaults;
# - ResNet-50 at 448 x 448 for 10 epochs: the paper's protocol. The synthetic row is the embedded demo's choice.
PUBLISHED = {
    "pascal": {"optimizer": "sgd", "lr": 5e-3, "LL-R": 0.2, "LL-Ct": 0.2, "LL-Cp": 0.1, "boostlu": True,
               "expected_num_pos": 1.5, "em_alpha": 0.2, "apl_beta": 0.02, "apl_warmup": 5},
    "coco": {"optimizer": "adam", "lr": 1e-5, "LL-R": 0.4, "LL-Ct": 0.2, "LL-Cp": 0.2, "boostlu": True,
             "expected_num_pos": 2.9, "em_alpha": 0.1, "apl_beta": 0.9, "apl_warmup": 5},
    "nuswide": {"optimizer": "adam", "lr": 1e-5, "LL-R": 0.4, "LL-Ct": 0.2, "LL-Cp": 0.2, "boostlu": True,
                "expected_num_pos": 1.9, "em_alpha": 0.1, "apl_beta": 0.2, "apl_warmup": 4},
    "cub": {"optimizer": "adam", "lr": 7.5e-5, "LL-R": 0.4, "LL-Ct": 0.4, "LL-Cp": 0.2, "boostlu": True,
            "expected_num_pos": 31.4, "em_alpha": 0.01, "apl_beta": 0.4, "apl_warmup": 3},
    "openimages": {"optimizer": "adam", "lr": 1e-5, "LL-R": 0.4, "LL-Ct": 0.2, "LL-Cp": 0.2, "boostlu": True,
                   "expected_num_pos": 0.0, "em_alpha": 0.1, "apl_beta": 0.9, "apl_warmup": 5},
    "synthetic": {"optimizer": "adam", "lr": 1e-3, "LL-R": 1.0, "LL-Ct": 0.5, "LL-Cp": 0.5, "boostlu": False,
                  "expected_num_pos": 2.5, "em_alpha": 0.1, "apl_beta": 0.2, "apl_warmup": 5},
}  # fmt: skip
BOOSTLU_DELTA_REL = {"LL-R": 0.5, "LL-Ct": 0.2, "LL-Cp": 0.1}
# Each row of the table and the flags that select it, with the delta_rel it must get (None: the scheme's own).
ROWS = {
    "full": (["--train_set_variant", "clean"], "AN"),
    "AN": (["--mod_scheme", "AN"], "AN"),
    "wan": (["--loss", "wan"], "AN"),
    "lsan": (["--loss", "lsan"], "AN"),
    "epr": (["--loss", "epr"], "AN"),
    "role": (["--loss", "role"], "AN"),
    "em": (["--loss", "em"], "AN"),
    "em_apl": (["--loss", "em_apl"], "AN"),
    "LL-R": (["--mod_scheme", "LL-R"], "LL-R"),
    "LL-Ct": (["--mod_scheme", "LL-Ct"], "LL-Ct"),
    "LL-Cp": (["--mod_scheme", "LL-Cp"], "LL-Cp"),
    "LL-R+BoostLU": (["--mod_scheme", "LL-R", "--boostlu_alpha", "5"], "LL-R"),
    "LL-Ct+BoostLU": (["--mod_scheme", "LL-Ct", "--boostlu_alpha", "5"], "LL-Ct"),
    "LL-Cp+BoostLU": (["--mod_scheme", "LL-Cp", "--boostlu_alpha", "5"], "LL-Cp"),
}
NOT_ON_OPENIMAGES = {"full", "epr", "role", "em_apl"}  # no full labels; no expected count; per-image state too large


def expected_config(dataset: str, row: str) -> dict:
    pub = PUBLISHED[dataset]
    _, scheme = ROWS[row]
    if scheme == "AN":
        delta = 0.0
    elif row.endswith("+BoostLU") and pub["boostlu"]:
        delta = BOOSTLU_DELTA_REL[scheme]
    else:
        delta = pub[scheme]
    synthetic = dataset == "synthetic"
    return {
        "optimizer": pub["optimizer"],
        "lr": pub["lr"],
        "arch": "smallcnn" if synthetic else "resnet50",
        "image_size": 32 if synthetic else 448,
        "num_epochs": 10,
        "bsize": 16,
        "lr_mult": 10.0,
        "mod_scheme": scheme,
        "delta_rel": delta,
        "expected_num_pos": pub["expected_num_pos"],
        "em_alpha": pub["em_alpha"],
        "apl_beta": pub["apl_beta"],
        "apl_warmup": pub["apl_warmup"],
        "apl_neg_proportion": 0.9,
        "ls_coef": 0.1,
        "linear_epochs": 25,
        "boostlu_alpha": 5.0 if row.endswith("+BoostLU") else 0.0,
        "num_pos": 1,
        "num_neg": 0,
        "label_proportion": None,
    }


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("dataset", list(PUBLISHED))
def test_resolved_config_is_the_published_settings(dataset, row):
    flags, _ = ROWS[row]
    argv = ["--dataset", dataset, *flags, "--exp_name", "x"]
    if dataset == "openimages" and row in NOT_ON_OPENIMAGES:
        with pytest.raises(SystemExit) as exc:
            parse_config(argv)
        assert exc.value.code == 2
        return
    cfg = parse_config(argv).to_dict()
    expected = expected_config(dataset, row)
    assert {k: cfg[k] for k in expected} == expected
    # every value not given on the command line is marked as a preset, in a fixed order
    given = {"mod_scheme", "boostlu_alpha"} & {f.lstrip("-") for f in flags}
    assert cfg["from_preset"] == [
        "arch", "image_size", "num_epochs", "optimizer", "lr", "delta_rel", "expected_num_pos", "em_alpha",
        "apl_beta", "apl_warmup",
    ]  # fmt: skip
    assert not given & set(cfg["from_preset"])


def test_every_dataset_is_in_the_published_table():
    """The built-in datasets; a researcher's own (docs/extending.md) need not be here."""
    assert set(PUBLISHED) == set(BUILT_IN_DATASETS) and set(BUILT_IN_DATASETS) <= set(datasets.DATASET_INFO)


def test_explicit_values_are_not_marked_as_preset():
    cfg = parse_config(["--dataset", "coco", "--lr", "2e-5", "--delta_rel", "0.3", "--exp_name", "x"])
    assert cfg.lr == 2e-5 and cfg.delta_rel == 0.3
    assert "lr" not in cfg.from_preset and "delta_rel" not in cfg.from_preset and "optimizer" in cfg.from_preset


def test_clean_labels_default_to_plain_bce():
    cfg = parse_config(["--train_set_variant", "clean", "--exp_name", "x"])
    assert cfg.mod_scheme == "AN" and cfg.delta_rel == 0.0


def test_config_is_frozen_and_json_round_trips():
    cfg = parse_config(["--exp_name", "x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    again = config.Config(**{**json.loads(cfg.to_json()), "from_preset": tuple(cfg.from_preset)})
    assert again == cfg


def test_default_exp_name_names_the_run_and_its_regime():
    assert parse_config(["--dataset", "coco", "--mod_scheme", "LL-Ct", "--seed", "3"]).exp_name.startswith(
        "coco_LL-Ct_d0.2_s3_"
    )
    assert parse_config(["--num_pos", "2", "--num_neg", "1"]).exp_name.startswith("synthetic_LL-R_d1_p2n1_s0_")
    assert parse_config(["--label_proportion", "0.3", "--loss", "wan"]).exp_name.startswith("synthetic_wan_prop0.3_s0_")
    assert parse_config(["--train_mode", "linear_init", "--mod_scheme", "AN"]).exp_name.startswith(
        "synthetic_AN_li_s0_"
    )


def test_regime_fields_are_training_settings_and_cache_dir_is_not():
    cfg = parse_config(["--num_pos", "2", "--num_neg", "3", "--cache_dir", "/tmp/c", "--exp_name", "x"])
    assert (cfg.num_pos, cfg.num_neg, cfg.label_proportion, cfg.cache_dir) == (2, 3, None, "/tmp/c")
    assert parse_config(["--label_proportion", "0.25", "--exp_name", "x"]).label_proportion == 0.25
    assert "cache_dir" in config.NOT_TRAINING_SETTINGS
    assert not {"num_pos", "num_neg", "label_proportion", "delta_rel", "seed"} & config.NOT_TRAINING_SETTINGS


def test_older_config_json_fields_read_as_defaults():
    defaults = config.config_defaults()
    assert {k: defaults[k] for k in ("num_pos", "num_neg", "label_proportion", "cache_dir", "boostlu_alpha")} == {
        "num_pos": 1, "num_neg": 0, "label_proportion": None, "cache_dir": None, "boostlu_alpha": 0.0
    }  # fmt: skip


def test_a_dataset_without_a_needed_preset_is_a_clean_error(monkeypatch, capsys):
    toy = dataclasses.replace(datasets.DATASET_INFO["synthetic"], title="Toy", defaults={"arch": "smallcnn"},
                              method_constants={})  # fmt: skip
    monkeypatch.setitem(datasets.DATASET_INFO, "toy", toy)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--dataset", "toy", "--exp_name", "x"])
    assert exc.value.code == 2 and "--image_size has no default for --dataset toy" in capsys.readouterr().err
    base = ["--dataset", "toy", "--image_size", "32", "--num_epochs", "2", "--optimizer", "adam", "--lr", "1e-3"]
    with pytest.raises(SystemExit):
        parse_config([*base, "--exp_name", "x"])  # LL-R's delta_rel has no preset for toy
    assert "--delta_rel has no preset for --dataset toy" in capsys.readouterr().err
    cfg = parse_config([*base, "--delta_rel", "2", "--exp_name", "x"])
    assert cfg.expected_num_pos == 0.0 and cfg.from_preset == ("arch", "expected_num_pos", "em_alpha", "apl_beta",
                                                               "apl_warmup")  # fmt: skip
    with pytest.raises(SystemExit):
        parse_config([*base, "--loss", "epr", "--exp_name", "x"])  # EPR needs its constant: no silent 0
    assert "--expected_num_pos has no preset for --dataset toy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--list_methods"])
    out = capsys.readouterr().out  # what such a run needs, not the default it records when the entry is not used
    line = next(line for line in out.splitlines() if line.lstrip().startswith("--expected_num_pos: "))
    assert "pascal 1.5, coco 2.9, nuswide 1.9, cub 31.4" in line and "synthetic 2.5" in line  # and any entry of yours
    assert line.endswith("toy: give --expected_num_pos")


def test_a_modifier_never_falls_back_to_the_plain_scheme_s_constant(monkeypatch, capsys):
    """A dataset entry with LL-R's delta_rel but not BoostLU's: LL-R + BoostLU is refused, never run with LL-R's."""
    info = datasets.DATASET_INFO["coco"]
    constants = {k: v for k, v in info.method_constants.items() if k != "LL-R+BoostLU"}
    monkeypatch.setitem(datasets.DATASET_INFO, "coco", dataclasses.replace(info, method_constants=constants))
    assert parse_config(["--dataset", "coco", "--exp_name", "x"]).delta_rel == 0.4
    with pytest.raises(SystemExit):
        parse_config(["--dataset", "coco", "--boostlu_alpha", "5", "--exp_name", "x"])
    err = capsys.readouterr().err
    assert "--delta_rel has no preset for --dataset coco" in err and "'LL-R+BoostLU'" in err
    given = ["--dataset", "coco", "--boostlu_alpha", "5", "--delta_rel", "0.5", "--exp_name", "x"]
    assert parse_config(given).delta_rel == 0.5


def test_a_dataset_constant_no_entry_reads_is_a_clean_error(monkeypatch, capsys):
    info = datasets.DATASET_INFO["coco"]
    constants = {**info.method_constants, "LL_R": {"delta_rel": 0.3}}  # a typo of a method's name
    monkeypatch.setitem(datasets.DATASET_INFO, "coco", dataclasses.replace(info, method_constants=constants))
    with pytest.raises(SystemExit) as exc:
        parse_config(["--exp_name", "x"])
    assert exc.value.code == 2
    assert "DATASET_INFO['coco'].method_constants['LL_R'] holds --delta_rel, which no entry" in capsys.readouterr().err


def test_list_methods_prints_the_registry(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--list_methods"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    expected = [
        "loss epr: EPR", "scheme LL-Cp: LL-Cp", "modifier boostlu: BoostLU", "mode linear_init: LinearInit",
        "--expected_num_pos: pascal 1.5, coco 2.9, nuswide 1.9, cub 31.4", "--delta_rel with LL-R: pascal 0.5",
        "--apl_warmup: pascal 5, coco 5, nuswide 4, cub 3", "not on openimages", "cub          CUB",
    ]  # fmt: skip
    for text in expected:
        assert text in out, text


def test_list_methods_names_gives_the_rows_a_dataset_offers(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--list_methods", "--names", "--dataset", "openimages"])
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    lines = [line for line in lines if line[0] in BUILT_IN_ROWS]
    assert [row for row, table, _ in lines if table == "table"] == ["AN", "wan", "lsan", "LL-R", "LL-Ct", "LL-Cp"]
    assert ["LL-R+BoostLU", "extra", "--mod_scheme LL-R --boostlu_alpha 5"] in lines
    with pytest.raises(SystemExit):
        parse_config(["--list_methods", "--names", "--dataset", "pascal", "--train_mode", "linear_init"])
    rows = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    end_to_end_only = ("vlpl", "aevlp")  # the CLIP pseudo-label methods, as their papers train
    assert [r for r in rows if r in BUILT_IN_ROWS] == [
        r for r in BUILT_IN_ROWS if "BoostLU" not in r and r not in end_to_end_only
    ]


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
        (["--val_frac", "0"], "val_frac"),
        (["--val_frac", "1"], "val_frac"),
        (["--ss_frac_train", "0"], "ss_frac_train"),
        (["--ss_frac_val", "1.5"], "ss_frac_val"),
        (["--use_pretrained", "maybe"], "boolean"),
        (["--train_set_variant", "clean", "--mod_scheme", "LL-R"], "clean"),
        (["--mod_scheme", "LL-Cp", "--delta_rel", "0"], "LL-Cp"),
        (["--exp_name", "a/b"], "exp_name"),
        (["--exp_name", "a\0b"], "exp_name"),
        (["--exp_name", "x" * 201], "at most 200"),
        (["--image_size", "1"], "--image_size must lie in [16, 2048]"),
        (["--image_size", "100000"], "--image_size must lie in [16, 2048]"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32 - 1"),
        (["--seed", str(2**32)], "--seed must lie in [0, 2**32 - 1"),
        (["--seed", str(2**70)], "--seed must lie in [0, 2**32 - 1"),
        (["--split_seed", str(2**32)], "--split_seed"),
        (["--num_pos", "-1"], "--num_pos must be an integer >= 0"),
        (["--num_neg", "-2"], "--num_neg must be an integer >= 0"),
        (["--num_pos", "0"], "observes no label"),
        (["--label_proportion", "0"], "--label_proportion must lie in (0, 1]"),
        (["--label_proportion", "1.5"], "--label_proportion must lie in (0, 1]"),
        (["--label_proportion", "0.5", "--num_pos", "2"], "without --num_pos"),
        (["--num_pos", "2", "--train_set_variant", "clean"], "every label is known"),
        (["--dataset", "openimages", "--num_pos", "2"], "OpenImages comes with its own partial labels"),
        (["--dataset", "openimages", "--train_set_variant", "clean"], "no full labels"),
        (["--dataset", "openimages", "--loss", "epr"], "--loss epr is not available for OpenImages"),
        (["--names"], "--names goes with --list_methods"),
        (["--loss", "em_apl", "--num_epochs", "3", "--apl_warmup", "3"], "--apl_warmup"),
        (["--ls_coef", "0.5"], "--ls_coef"),
        (["--linear_epochs", "0"], "--linear_epochs"),
        # a setting the run would ignore is refused, not recorded in config.json as if it had been used
        (
            ["--loss", "an", "--em_alpha", "5"],
            "--em_alpha is a setting of --loss em or --loss em_apl or --loss vlpl, which this run",
        ),
        (["--linear_epochs", "3"], "--linear_epochs is a setting of --train_mode linear_init, which this run"),
        (["--loss", "gr", "--em_alpha", "0.5"], "drop it, or add one of them"),
        (["--mod_scheme", "AN", "--delta_rel", "0.5"], "choose --mod_scheme LL-R / LL-Ct / LL-Cp"),
        (["--loss", "wan", "--delta_rel", "0.5"], "--loss wan takes no scheme: drop it"),
        (["--pretrained_weights", "IMAGENET1K_V2"], "--arch smallcnn has its own"),
        (["--arch", "resnet18", "--use_pretrained", "false", "--pretrained_weights", "X"], "loads no weights"),
        (["--loss", "epr", "--expected_num_pos", "17"], "at most the 16 classes of"),
        # a flag given twice (a script's EXTRA repeating one it sets) would silently take the last value
        (["--seed", "1", "--lr", "1e-4", "--seed=5"], "--seed given more than once"),
        (["--mod", "LL-R"], "unrecognized arguments: --mod"),
        (["--save_path", ""], "--save_path is empty"),
        (["--bsize", str(10**20)], "--bsize must be at most 65536"),  # beyond it, the samplers' arithmetic overflows
        (["--num_workers", "100000"], "--num_workers must lie in [0, 256]"),  # as many processes would start
        (["--lr", "inf"], "--lr must be a finite number (got inf)"),
        (["--loss", "gr", "--gr_sigma", "nan", "1"], "--gr_sigma must be a finite number (got nan 1.0)"),
        (["--loss", "gr", "--gr_b", "inf", "0"], "--gr_b must be a finite number"),
        (["--label_proportion", "nan"], "--label_proportion must be a finite number"),
        (["--data_root", ""], "--data_root is empty"),  # no abbreviations: flags are named in full
    ],
)
def test_bad_values_exit_with_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err


def test_given_settings_that_change_nothing_or_are_used_are_accepted():
    """A flag at its default (--boostlu_alpha 0 switches BoostLU off), or one the run uses, is no reason to refuse."""
    assert parse_config(["--boostlu_alpha", "0", "--em_alpha", "0.1", "--exp_name", "x"]).boostlu_alpha == 0
    assert parse_config(["--mod_scheme", "AN", "--delta_rel", "0", "--exp_name", "x"]).delta_rel == 0
    assert parse_config(["--loss", "em", "--em_alpha", "5", "--exp_name", "x"]).em_alpha == 5
    assert parse_config(["--arch", "resnet18", "--pretrained_weights", "IMAGENET1K_V1", "--exp_name", "x"])
    assert parse_config(["--loss", "epr", "--expected_num_pos", "16", "--exp_name", "x"]).expected_num_pos == 16
    # the value the run records anyway: a preset that applies whatever the loss, the default weights
    assert parse_config(["--dataset", "pascal", "--loss", "an", "--em_alpha", "0.2", "--exp_name", "x"]).em_alpha == 0.2
    assert parse_config(["--use_pretrained", "false", "--pretrained_weights", "IMAGENET1K_V1", "--exp_name", "x"])


def test_an_older_unfinished_run_that_recorded_an_ignored_setting_resumes_with_its_command(tmp_path, capsys):
    """A run started before these settings were refused (AN with --delta_rel 5 recorded 5): its own command still
    resumes it, since its config.json holds that value; a new run with the same flags is refused."""
    argv = ["--mod_scheme", "AN", "--delta_rel", "5", "--save_path", str(tmp_path), "--exp_name", "old"]
    with pytest.raises(SystemExit):
        parse_config(argv)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"mod_scheme": "AN", "delta_rel": 5.0}))
    assert parse_config(argv).delta_rel == 5.0
    with pytest.raises(SystemExit):
        parse_config([*argv[:3], "6", *argv[4:]])  # not the recorded value: refused
    assert "--delta_rel is the large-loss schemes' rate" in capsys.readouterr().err


def test_the_bounds_themselves_are_accepted():
    cfg = parse_config(["--image_size", "16", "--seed", str(2**32 - 1), "--exp_name", "x" * 200])
    assert (cfg.image_size, cfg.seed, len(cfg.exp_name)) == (16, 2**32 - 1, 200)
    assert parse_config(["--image_size", "2048", "--label_proportion", "1", "--exp_name", "x"]).image_size == 2048
