"""The table's methods from the command line, the CAM figure, the report and the sweep script."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import BUILT_IN_ROWS, REPO, read_run, run_main

import report

TINY = ["--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--num_epochs", "2", "--num_workers", "0"]


def tiny(synthetic_root, save, name, *extra):
    run_main("--data_root", str(synthetic_root), "--save_path", str(save), "--exp_name", name, *TINY, *extra)
    return read_run(save / name)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["wan", "lsan", "epr", "em", "em_apl"])
def test_baselines_run_from_the_command_line(synthetic_root, tmp_path, loss):
    extra = ["--apl_warmup", "1"] if loss == "em_apl" else []
    config, log, final = tiny(synthetic_root, tmp_path, loss, "--loss", loss, *extra)
    assert config["loss"] == loss and config["mod_scheme"] == "AN"
    assert all(r["num_selected"] == 0 for r in log) and 0 < final["test_map"] <= 100
    assert log[0]["fn_prob"] is not None and log[0]["tn_prob"] is not None  # diagnostics with known clean labels
    if loss == "em_apl":
        assert log[0]["pseudo_labelled"] > 0


@pytest.mark.slow
def test_linear_init_then_fine_tuning_logs_both_phases(synthetic_root, tmp_path):
    _, log, final = tiny(synthetic_root, tmp_path, "li", "--train_mode", "linear_init", "--linear_epochs", "3")
    assert [(r["phase"], r["epoch"]) for r in log] == [("linear", 1), ("linear", 2), ("linear", 3),
                                                       ("end_to_end", 1), ("end_to_end", 2)]  # fmt: skip
    assert final["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_boostlu_ll_cp_logs_corrections_and_cam_draws_figures(synthetic_root, tmp_path):
    config, log, _ = tiny(synthetic_root, tmp_path, "boost", "--mod_scheme", "LL-Cp", "--delta_rel", "5",
                          "--boostlu_alpha", "5")  # fmt: skip
    assert config["boostlu_alpha"] == 5.0
    assert log[1]["corrected_total"] == log[1]["num_selected"] > 0 and 0 <= log[1]["corrected_precision"] <= 1
    image = synthetic_root / "images" / "test" / "test_000000.png"
    (tmp_path / "other").mkdir()
    namesake = tmp_path / "other" / "test_000000.png"  # another image of the same stem: its own figure
    namesake.write_bytes((synthetic_root / "images" / "test" / "test_000001.png").read_bytes())
    proc = subprocess.run([sys.executable, str(REPO / "cam.py"), str(tmp_path / "boost"), str(image), str(namesake),
                           "--top", "2"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    figure = Image.open(tmp_path / "boost" / "cam" / "test_000000_cam.png")
    assert figure.size == (3 * 256, 276)  # the input and two class maps
    second = Image.open(tmp_path / "boost" / "cam" / "test_000000_2_cam.png")
    assert f"(for {namesake})" in proc.stdout and second.tobytes() != figure.tobytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss", "wan", "--mod_scheme", "LL-R"], "combine it with --loss an"),
        (["--train_mode", "linear_init", "--boostlu_alpha", "5"], "CAM form"),
        (["--dataset", "openimages", "--loss", "role"], "not available for OpenImages"),
    ],
)
def test_invalid_combinations_are_refused(args, message, capsys):
    from config import parse_config

    with pytest.raises(SystemExit) as exc:
        parse_config(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def write_run(
    root, name, *, dataset="pascal", loss="an", scheme="LL-R", delta=0.2, seed=0, val=80.0, test=79.0, log=(),
    mode="end_to_end", boost=0.0, drop=(), metrics=None, **extra,
):  # fmt: skip
    folder = root / name
    folder.mkdir(parents=True)
    config = {"dataset": dataset, "loss": loss, "mod_scheme": scheme, "delta_rel": delta, "seed": seed,
              "train_set_variant": "observed", "boostlu_alpha": boost, "train_mode": mode, "lr": 5e-3,
              "exp_name": name, "save_path": str(root), **extra}  # fmt: skip
    for key in drop:  # a config.json written before these fields existed
        config.pop(key)
    final = {"val_map": val, "test_map": test, "best_epoch": 1}
    if metrics is not None:
        final["test_metrics"] = metrics
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "final.json").write_text(json.dumps(final))
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return folder


def test_report_picks_the_best_delta_by_val_and_averages_seeds(tmp_path):
    runs = tmp_path / "runs"
    # LL-R at delta 0.2: val 80, 82 -> mean 81; at delta 0.4: val 83, 83 -> mean 83 (the best), test 88 and 90
    write_run(runs, "a", delta=0.2, seed=0, val=80, test=91)
    write_run(runs, "b", delta=0.2, seed=1, val=82, test=91)
    write_run(runs, "c", delta=0.4, seed=0, val=83, test=88, log=[{"epoch": 1, "val_map": 70, "fn_prob": 0.2}])
    write_run(runs, "d", delta=0.4, seed=1, val=83, test=90)
    write_run(runs, "e", loss="wan", scheme="AN", delta=0.0, seed=0, val=70, test=86.0)
    write_run(runs, "f", loss="wan", scheme="AN", delta=0.0, seed=0, val=60, test=99.0, lr=1e-2)  # lost on val
    write_run(runs, "g", loss="wan", scheme="AN", delta=0.0, seed=0, val=50, test=99.0, lr=1e-3)
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    # what competed, so that a row chosen for another lr is not taken for the preset's
    assert "- LL-R, VOC12: 2 settings (delta_rel 0.2, 0.4); chosen: delta_rel 0.4\n" in table
    assert "- WAN, VOC12: 3 settings (lr 0.001, 0.005, 0.01); chosen: lr 0.005\n" in table
    # mean 89.0, sample std of (88, 90) = 1.414...; the paper's VOC LL-R is 89.2 -> difference -0.2
    assert "| LL-R | 89.0 +- 1.4 (d 0.4) [n=2] [paper 89.2, -0.2] |" in table
    assert "| WAN | 86.0 +- 0.0 [n=1] [paper 86.5, -0.5] |" in table
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    ll_r = next(r for r in rows if r["method"] == "LL-R")
    assert ll_r["delta_rel"] == "0.4" and ll_r["seeds"] == "0 1" and float(ll_r["test_mean"]) == 89.0
    assert (ll_r["settings"], ll_r["chosen"]) == ("2", "delta_rel=0.4")
    assert not (tmp_path / "out" / "thresholds.csv").exists()  # no run recorded threshold metrics


def test_report_counts_each_seed_once_and_lists_the_duplicates(tmp_path, capsys):
    runs = tmp_path / "runs"
    # the same command three times without --exp_name: three folders, one seed
    for i, test in enumerate((30.0, 40.0, 50.0)):
        write_run(runs, f"pascal_LL-R_d0.2_s0_2024010{i}", test=test, num_workers=i)
    write_run(runs, "other_seed", seed=1, test=60.0)
    assert report.main([str(runs), str(runs / "other_seed"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| LL-R | 45.0 +- 21.2 (d 0.2) [n=2]" in out  # seeds 0 (30, the first folder) and 1 (60)
    first = runs / "pascal_LL-R_d0.2_s0_20240100"
    assert (f"skipped as duplicates of {first} (same method, dataset, settings and seed): "
            f"{runs / 'pascal_LL-R_d0.2_s0_20240101'}, {runs / 'pascal_LL-R_d0.2_s0_20240102'}") in out  # fmt: skip
    assert "other_seed" not in out.split("skipped as duplicates")[1]  # a folder reached twice is one run, not a copy


def test_report_reads_fields_missing_from_older_configs_as_their_defaults(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "old", seed=0, test=80.0, drop=("train_mode", "boostlu_alpha", "loss"))
    write_run(runs, "new", seed=1, test=82.0, num_pos=1, num_neg=0, label_proportion=None, ls_coef=0.1)
    write_run(runs, "regime", seed=0, test=10.0, val=10.0, num_pos=2)  # another regime: a row of its own
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    expected = [("LL-R", "0 1", "81.0"), ("LL-R [p2n0]", "0", "10.0")]
    assert [(r["method"], r["seeds"], r["test_mean"]) for r in rows] == expected
    assert "skipped" not in capsys.readouterr().out


def test_report_skips_folders_it_cannot_read_with_a_message(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "good", test=70.0)
    (runs / "no_config").mkdir()
    (runs / "no_config" / "final.json").write_text(json.dumps({"val_map": 1, "test_map": 2}))
    write_run(runs, "empty_final")
    (runs / "empty_final" / "final.json").write_text("")
    write_run(runs, "bad_config", seed=1)
    (runs / "bad_config" / "config.json").write_text("{not json")
    write_run(runs, "list_config", seed=2)
    (runs / "list_config" / "config.json").write_text("[1, 2]")
    write_run(runs, "no_test_map", seed=3)
    (runs / "no_test_map" / "final.json").write_text(json.dumps({"val_map": 80.0}))
    write_run(runs, "no_dataset", seed=4, drop=("dataset",))
    write_run(runs, "text_boost", seed=5, boost="x")  # hand-edited: a string where a number belongs
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| LL-R | 70.0 +- 0.0 (d 0.2) [n=1]" in out and "Traceback" not in out
    for line in (
        f"skipped {runs / 'no_config'}: final.json but no config.json",
        f"skipped {runs / 'empty_final'}: final.json is empty",
        f"skipped {runs / 'bad_config'}: config.json is not valid JSON",
        f"skipped {runs / 'list_config'}: config.json does not hold a JSON object",
        f"skipped {runs / 'no_test_map'}: no usable test_map",
        f"skipped {runs / 'no_dataset'}: no usable dataset",
        f"skipped {runs / 'text_boost'}: config.json is not a valid config (boostlu_alpha must be a number (got 'x'))",
    ):
        assert line in out, line
    only_bad = tmp_path / "only_bad"
    (only_bad / "x").mkdir(parents=True)
    (only_bad / "x" / "final.json").write_text("")
    assert report.main([str(only_bad), "--out", str(tmp_path / "out2")]) == 1
    assert "no finished run" in capsys.readouterr().out


def test_report_gives_other_label_regimes_rows_of_their_own_without_the_paper(tmp_path):
    """A run with more observed labels, or a proportion of them, is no run of the paper's single-positive table: it is
    neither picked as the row's best setting nor compared with the paper's number."""
    runs = tmp_path / "runs"
    write_run(runs, "single", delta=0.2, val=80, test=89.0)
    write_run(runs, "p2n1", delta=0.2, val=95, test=93.0, num_pos=2, num_neg=1)  # a better val: must not win
    write_run(runs, "prop", loss="wan", scheme="AN", delta=0.0, val=20, test=10.8, label_proportion=0.01)
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| LL-R | 89.0 +- 0.0 (d 0.2) [n=1] [paper 89.2, -0.2] |" in table
    assert "| LL-R [p2n1] | 93.0 +- 0.0 (d 0.2) [n=1] |" in table
    assert "| wan [prop0.01] | 10.8 +- 0.0 [n=1] |" in table and "| WAN |" not in table


def test_report_looks_the_paper_up_by_dataset_name(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "cub", dataset="cub", scheme="LL-R", delta=0.4, test=19.0)
    write_run(runs, "oi", dataset="openimages", loss="wan", scheme="AN", delta=0.0, test=70.0)
    write_run(runs, "nus", dataset="nuswide", loss="em_apl", scheme="AN", delta=0.0, test=47.0)
    write_run(runs, "li", dataset="coco", loss="role", scheme="AN", delta=0.0, mode="linear_init", test=60.0)
    write_run(runs, "boost", dataset="cub", scheme="LL-Ct", delta=0.2, boost=5.0, test=19.0)
    write_run(runs, "syn", dataset="synthetic", scheme="LL-R", delta=1.0, test=80.0)
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    rows = {
        (r["train_mode"], r["dataset"], r["method"]): r for r in csv.DictReader(open(tmp_path / "out" / "report.csv"))
    }
    papers = {key: row["paper"] for key, row in rows.items()}
    assert papers == {
        ("end_to_end", "cub", "LL-R"): "19.5",
        ("end_to_end", "openimages", "wan"): "77.0",
        ("end_to_end", "nuswide", "em_apl"): "47.59",
        ("linear_init", "coco", "role"): "69.0",
        ("end_to_end", "cub", "LL-Ct+BoostLU"): "19.25",
        ("end_to_end", "synthetic", "LL-R"): "",
    }
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| Method | NUS-WIDE | CUB | OpenImages | synthetic |" in table and "| LL-Ct + BoostLU | - |" in table


def test_report_tabulates_threshold_metrics_when_runs_have_them(tmp_path):
    runs = tmp_path / "runs"
    names = ("CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3")
    write_run(runs, "a", seed=0, metrics={n: 60.0 + i for i, n in enumerate(names)})
    write_run(runs, "b", seed=1, metrics={n: 62.0 + i for i, n in enumerate(names)})
    write_run(runs, "c", seed=2)  # an older run without them: left out of that table
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert "#### Threshold metrics, VOC12" in table
    assert "| LL-R | 61.0 +- 1.4 | 62.0 +- 1.4 | 63.0 +- 1.4 |" in table and table.rstrip().endswith(
        "| 72.0 +- 1.4 | 2 |"
    )
    assert "[n=3]" in table  # the mAP still averages every seed
    (row,) = csv.DictReader(open(tmp_path / "out" / "thresholds.csv"))
    assert (row["method"], row["n"], float(row["OF1_top3_mean"])) == ("LL-R", "2", 72.0)


def test_report_without_runs_says_so(tmp_path, capsys):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no finished run" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_skips_finished_runs(tmp_path):
    save = tmp_path / "sweep"
    (save / "pascal_LL-R_d0.1_s0").mkdir(parents=True)
    (save / "pascal_LL-R_d0.1_s0" / "final.json").write_text("{}")
    (save / "pascal_LL-R_d0.2_s0").mkdir()  # unfinished: run (main.py resumes it)
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "stub.py"
    stub.write_text(
        "import sys, pathlib\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "a = sys.argv; d = pathlib.Path(a[a.index('--save_path') + 1]) / a[a.index('--exp_name') + 1]\n"
        "d.mkdir(parents=True, exist_ok=True); (d / 'final.json').write_text('{}')\n"
    )
    env = {**os.environ, "PY": f"{sys.executable} {stub}", "SAVE": str(save), "DATASETS": "pascal",
           "SCHEMES": "LL-R", "DELTAS": "0.1 0.2 0.3", "SEEDS": "0"}  # fmt: skip
    out = subprocess.run(["bash", str(REPO / "scripts" / "sweep_delta_rel.sh"), "--num_epochs", "1"], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "skip pascal_LL-R_d0.1_s0 (finished)" in out
    invoked = calls.read_text().splitlines()
    assert [line.split("--exp_name ")[1].split()[0] for line in invoked] == [
        "pascal_LL-R_d0.2_s0",
        "pascal_LL-R_d0.3_s0",
    ]
    assert all("--num_epochs 1" in line and "main.py" in line for line in invoked)
    # a second run finds everything finished
    again = subprocess.run(["bash", str(REPO / "scripts" / "sweep_delta_rel.sh")], env=env, capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert again.count("skip") == 3 and len(calls.read_text().splitlines()) == 2
    # AN has no rate: once per seed, without --delta_rel (main.py refuses it with AN)
    calls.unlink()
    subprocess.run(["bash", str(REPO / "scripts" / "sweep_delta_rel.sh")], env={**env, "SCHEMES": "AN"}, check=True,
                   capture_output=True)  # fmt: skip
    assert [line.split("main.py ")[1] for line in calls.read_text().splitlines()] == [
        f"--dataset pascal --mod_scheme AN --seed 0 --save_path {save} --exp_name pascal_AN_s0"
    ]


@pytest.mark.slow
def test_reproduce_table_runs_the_registry_rows(tmp_path):
    """scripts/reproduce_table.sh asks main.py --list_methods --names for the rows: every row a dataset offers."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "stub.py"
    stub.write_text(
        "import os, sys\n"
        "if '--list_methods' in sys.argv: os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    )
    env = {**os.environ, "PY": f"{sys.executable} {stub}", "SAVE": str(tmp_path / "t")}
    script = str(REPO / "scripts" / "reproduce_table.sh")
    subprocess.run(["bash", script, "openimages", "3"], env=env, capture_output=True, text=True, check=True)

    def built_in_rows(dataset: str) -> list[str]:  # a researcher's own rows (docs/extending.md) left aside
        invoked = [line.split("--exp_name ")[1] for line in calls.read_text().splitlines()]
        return [line for line in invoked if line.split()[0].removeprefix(f"{dataset}_").rsplit("_end_to_end", 1)[0]
                in BUILT_IN_ROWS]  # fmt: skip

    assert built_in_rows("openimages") == [
        "openimages_AN_end_to_end_s3 --mod_scheme AN",
        "openimages_wan_end_to_end_s3 --loss wan",
        "openimages_lsan_end_to_end_s3 --loss lsan",
        "openimages_LL-R_end_to_end_s3 --mod_scheme LL-R",
        "openimages_LL-Ct_end_to_end_s3 --mod_scheme LL-Ct",
        "openimages_LL-Cp_end_to_end_s3 --mod_scheme LL-Cp",
    ]
    calls.unlink()
    subprocess.run(["bash", script, "pascal"], env=env, capture_output=True, text=True, check=True)
    assert [line.split()[0] for line in built_in_rows("pascal")] == [f"pascal_{r}_end_to_end_s0" for r in BUILT_IN_ROWS]
    bad = subprocess.run(["bash", script, "openimages"], env={**env, "METHODS": "epr"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "epr is not a row offered on openimages" in bad.stderr


def test_reproduce_table_refuses_extra_flags_that_repeat_its_own(tmp_path):
    """EXTRA="--seed 5" would make every seed's folder hold seed 5: main.py refuses the repeat, the script stops."""
    env = {**os.environ, "PY": sys.executable, "SAVE": str(tmp_path / "t"), "METHODS": "AN", "EXTRA": "--seed 5"}
    script = str(REPO / "scripts" / "reproduce_table.sh")
    bad = subprocess.run(["bash", script, "synthetic", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--seed given more than once" in bad.stderr
    assert not (tmp_path / "t" / "synthetic_AN_end_to_end_s1").exists()


def test_report_counts_runs_that_differ_in_settings_they_never_read_as_one_setting(tmp_path, capsys):
    """Older versions recorded settings a run ignores (an AN run's --delta_rel 0.5, an LL-R run's --em_alpha 5): they
    trained the same, so they are seeds (or duplicates) of one setting, not settings competing by val mAP."""
    runs = tmp_path / "runs"
    write_run(runs, "an_d0", scheme="AN", delta=0.0, seed=0, val=70, test=80.0)
    write_run(runs, "an_d0.5", scheme="AN", delta=0.5, seed=0, val=70, test=80.0)  # the same run, recorded otherwise
    write_run(runs, "an_d0.5_s1", scheme="AN", delta=0.5, seed=1, val=90, test=90.0)
    write_run(runs, "llr", seed=0, val=80, test=70.0)
    write_run(runs, "llr_em5", seed=1, val=81, test=72.0, em_alpha=5.0)
    write_run(runs, "llr_d0.4", delta=0.4, seed=0, val=79, test=99.0)  # a setting LL-R reads: compared by val, loses
    write_run(runs, "llr_gamma", seed=2, val=80, test=71.0, focal_gamma=3.0)  # a method no longer registered had it
    write_run(runs, "own", loss="focal_an", scheme="AN", delta=0.0, test=60.0)  # a method not registered here
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| Naive AN | 85.0 +- 7.1 [n=2]" in out and f"skipped as duplicates of {runs / 'an_d0'}" in out
    assert "| LL-R | 71.0 +- 1.0 (d 0.2) [n=3]" in out and "60.0 +- 0.0 [n=1]" in out
    assert str(runs / "llr_d0.4") not in out  # not a duplicate of "llr": another setting, which lost on val
