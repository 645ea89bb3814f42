"""The table's methods from the command line, the CAM figure, the report and the sweep script."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, read_run, run_cli

import report

TINY = ["--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--num_epochs", "2", "--num_workers", "0"]


def tiny(synthetic_root, save, name, *extra):
    run_cli("--data_root", str(synthetic_root), "--save_path", str(save), "--exp_name", name, *TINY, *extra)
    return read_run(save / name)


@pytest.mark.parametrize("loss", ["wan", "lsan", "epr", "em", "em_apl"])
def test_baselines_run_from_the_command_line(synthetic_root, tmp_path, loss):
    extra = ["--apl_warmup", "1"] if loss == "em_apl" else []
    config, log, final = tiny(synthetic_root, tmp_path, loss, "--loss", loss, *extra)
    assert config["loss"] == loss and config["mod_scheme"] == "AN"
    assert all(r["num_selected"] == 0 for r in log) and 0 < final["test_map"] <= 100
    assert log[0]["fn_prob"] is not None and log[0]["tn_prob"] is not None  # diagnostics with known clean labels
    if loss == "em_apl":
        assert log[0]["pseudo_labelled"] > 0


def test_linear_init_then_fine_tuning_logs_both_phases(synthetic_root, tmp_path):
    _, log, final = tiny(synthetic_root, tmp_path, "li", "--train_mode", "linear_init", "--linear_epochs", "3")
    assert [(r["phase"], r["epoch"]) for r in log] == [("linear", 1), ("linear", 2), ("linear", 3),
                                                       ("end_to_end", 1), ("end_to_end", 2)]  # fmt: skip
    assert final["best_epoch"] in (1, 2)


def test_boostlu_ll_cp_logs_corrections_and_cam_draws_figures(synthetic_root, tmp_path):
    config, log, _ = tiny(synthetic_root, tmp_path, "boost", "--mod_scheme", "LL-Cp", "--delta_rel", "5",
                          "--boostlu_alpha", "5")  # fmt: skip
    assert config["boostlu_alpha"] == 5.0
    assert log[1]["corrected_total"] == log[1]["num_selected"] > 0 and 0 <= log[1]["corrected_precision"] <= 1
    image = synthetic_root / "images" / "test" / "test_000000.png"
    proc = subprocess.run([sys.executable, str(REPO / "cam.py"), str(tmp_path / "boost"), str(image), "--top", "2"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    figure = Image.open(tmp_path / "boost" / "cam" / "test_000000_cam.png")
    assert figure.size == (3 * 256, 276)  # the input and two class maps


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
    root, name, *, dataset="pascal", loss="an", scheme="LL-R", delta=0.2, seed=0, val=80.0, test=79.0, log=()
):
    folder = root / name
    folder.mkdir(parents=True)
    config = {"dataset": dataset, "loss": loss, "mod_scheme": scheme, "delta_rel": delta, "seed": seed,
              "train_set_variant": "observed", "boostlu_alpha": 0.0, "train_mode": "end_to_end", "lr": 5e-3,
              "exp_name": name, "save_path": str(root)}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "final.json").write_text(json.dumps({"val_map": val, "test_map": test, "best_epoch": 1}))
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def test_report_picks_the_best_delta_by_val_and_averages_seeds(tmp_path):
    runs = tmp_path / "runs"
    # LL-R at delta 0.2: val 80, 82 -> mean 81; at delta 0.4: val 83, 83 -> mean 83 (the best), test 88 and 90
    write_run(runs, "a", delta=0.2, seed=0, val=80, test=91)
    write_run(runs, "b", delta=0.2, seed=1, val=82, test=91)
    write_run(runs, "c", delta=0.4, seed=0, val=83, test=88, log=[{"epoch": 1, "val_map": 70, "fn_prob": 0.2}])
    write_run(runs, "d", delta=0.4, seed=1, val=83, test=90)
    write_run(runs, "e", loss="wan", scheme="AN", delta=0.0, seed=0, val=70, test=86.0)
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    # mean 89.0, sample std of (88, 90) = 1.414...; the paper's VOC LL-R is 89.2 -> difference -0.2
    assert "| LL-R | 89.0 +- 1.4 (d 0.4) [n=2] [paper 89.2, -0.2] |" in table
    assert "| WAN | 86.0 +- 0.0 [n=1] [paper 86.5, -0.5] |" in table
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    ll_r = next(r for r in rows if r["method"] == "LL-R")
    assert ll_r["delta_rel"] == "0.4" and ll_r["seeds"] == "0 1" and float(ll_r["test_mean"]) == 89.0


def test_report_without_runs_says_so(tmp_path, capsys):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no finished run" in capsys.readouterr().out


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
