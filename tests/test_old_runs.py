"""Run folders made by an older version (commit e638bf7, before the dataset entries, the registry and the file layout
changed) still resume and report: tests/fixtures/runs_e638bf7 (its README says how they were made)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, read_run, run_main

FIXTURES = REPO / "tests" / "fixtures" / "runs_e638bf7"
# The command the unfinished run was started with (its README), less where the data and runs are.
COMMAND = ["--exp_name", "old_unfinished", "--ss_frac_train", "0.15", "--ss_frac_val", "0.2", "--num_workers", "0",
           "--delta_rel", "5", "--seed", "0", "--num_epochs", "3", "--mod_scheme", "LL-Cp"]  # fmt: skip


@pytest.mark.slow  # generates the synthetic data and trains two epochs
def test_a_run_killed_by_the_older_version_resumes_and_reports(synthetic_root, tmp_path):
    shutil.copytree(FIXTURES / "killed_after_epoch_1", tmp_path / "runs" / "old_unfinished")
    shutil.copytree(FIXTURES / "finished_2_epochs", tmp_path / "runs" / "old_finished")
    old_log = (FIXTURES / "killed_after_epoch_1" / "log.jsonl").read_text().splitlines()

    proc = run_main(*COMMAND, "--data_root", str(synthetic_root), "--save_path", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 0, proc.stderr
    config, log, final = read_run(tmp_path / "runs" / "old_unfinished")
    assert [line["epoch"] for line in log] == [1, 2, 3]
    assert json.dumps(log[0]) == json.dumps(json.loads(old_log[0]))  # the older version's epoch, kept as it was
    assert 0 < final["test_map"] <= 100 and final["epochs_run"] == 3
    assert config["data_root"] == "/tmp/oldfix/data"  # the folder's config.json is the older version's, untouched

    out = tmp_path / "report"
    report = subprocess.run([sys.executable, str(REPO / "report.py"), str(tmp_path / "runs"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr
    table = (out / "report.md").read_text()
    assert "| LL-Cp |" in table and "2 settings (num_epochs 2, 3)" in table  # both older runs read, as two settings
    assert "end_to_end,synthetic,LL-Cp,5.0,0," in (out / "report.csv").read_text()
