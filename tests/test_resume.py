"""Exact resume: a run killed at any moment, or interrupted, continues to the same final.json and log.jsonl; damaged
checkpoints fall back to the previous one; a full disk leaves the checkpoints intact; other configs are refused."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_main

import main

pytestmark = pytest.mark.slow  # every test here trains or runs main.py in a subprocess

ARGS = [
    "--ss_frac_train",
    "0.15",
    "--ss_frac_val",
    "0.2",
    "--num_epochs",
    "3",
    "--num_workers",
    "0",
    "--delta_rel",
    "5",
]


def command(synthetic_root, save, name, scheme):
    return [sys.executable, str(REPO / "main.py"), "--data_root", str(synthetic_root), "--save_path", str(save),
            "--exp_name", name, "--mod_scheme", scheme, *ARGS]  # fmt: skip


def without_timings(folder):
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    final = json.loads((folder / "final.json").read_text())
    for record in [*log, final]:
        for key in [k for k in record if k == "seconds" or k.endswith("_seconds")]:
            del record[key]
    return log, final


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    """Uninterrupted runs, one per scheme."""
    save = tmp_path_factory.mktemp("reference")
    for scheme in ("LL-R", "LL-Cp"):
        subprocess.run(command(synthetic_root, save, scheme, scheme), check=True, capture_output=True, timeout=600)
    return save


def wait_for_lines(path, lines, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before writing {lines} log lines")
        time.sleep(0.02)
    pytest.fail("timed out")


@pytest.mark.parametrize("scheme", ["LL-R", "LL-Cp"])
def test_a_run_killed_after_epoch_2_resumes_to_the_same_result(synthetic_root, tmp_path, reference, scheme):
    cmd = command(synthetic_root, tmp_path, "killed", scheme)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(tmp_path / "killed" / "log.jsonl", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final.json").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stdout
    assert without_timings(tmp_path / "killed") == without_timings(reference / scheme)


def test_sigint_stops_with_a_consistent_checkpoint_and_resumes(synthetic_root, tmp_path, reference):
    cmd = command(synthetic_root, tmp_path, "int", "LL-Cp")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(tmp_path / "int" / "log.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "consistent" in err and "run the same command (with --exp_name int) again to resume" in err
    assert "Traceback" not in err
    saved = torch.load(tmp_path / "int" / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["epoch"] >= 1
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    assert without_timings(tmp_path / "int") == without_timings(reference / "LL-Cp")


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(synthetic_root, tmp_path, reference):
    folder = tmp_path / "damaged"
    shutil.copytree(reference / "LL-Cp", folder)
    (folder / "final.json").unlink()
    data = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    proc = subprocess.run(command(synthetic_root, tmp_path, "damaged", "LL-Cp"), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot be read" in proc.stdout and "resuming after epoch 2" in proc.stdout
    assert without_timings(folder) == without_timings(reference / "LL-Cp")


def test_a_run_from_before_a_new_config_field_resumes_to_the_same_result(synthetic_root, tmp_path, reference):
    """After an upgrade that added boostlu_alpha and ls_coef, an unfinished run whose config.json and checkpoints lack
    them (and that has no data.json) resumes, reading them as their defaults, to the uninterrupted run's result."""
    folder = tmp_path / "old"
    shutil.copytree(reference / "LL-Cp", folder)
    (folder / "final.json").unlink()
    (folder / "data.json").unlink(missing_ok=True)
    os.replace(folder / "checkpoint_prev.pt", folder / "checkpoint.pt")  # stopped after epoch 2
    saved = json.loads((folder / "config.json").read_text())
    payload = torch.load(folder / "checkpoint.pt", weights_only=True)
    for name in ("boostlu_alpha", "ls_coef"):
        del saved[name], payload["config"][name]
    (folder / "config.json").write_text(json.dumps(saved))
    torch.save(payload, folder / "checkpoint.pt")
    proc = subprocess.run(command(synthetic_root, tmp_path, "old", "LL-Cp"), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming after epoch 2" in proc.stdout
    assert without_timings(folder) == without_timings(reference / "LL-Cp")


def test_a_finished_run_is_not_run_again(synthetic_root, reference):
    before = (reference / "LL-R" / "final.json").read_bytes()
    proc = subprocess.run(command(synthetic_root, reference.parent / reference.name, "LL-R", "LL-R"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "finished run" in proc.stdout and "epoch" not in proc.stdout.split("finished")[1]
    assert (reference / "LL-R" / "final.json").read_bytes() == before


def test_a_run_folder_with_another_config_is_refused(synthetic_root, reference):
    proc = run_main("--data_root", str(synthetic_root), "--save_path", str(reference), "--exp_name", "LL-R",
                   "--mod_scheme", "LL-R", *ARGS[:-2], "--delta_rel", "3", check=False)  # fmt: skip
    assert proc.returncode == 1 and "different config (delta_rel differ)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_without_a_run_says_so(synthetic_root, tmp_path):
    proc = run_main("--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "nothing",
                   "--resume", check=False)  # fmt: skip
    assert proc.returncode == 1 and "no run to resume" in proc.stderr
    # a run folder whose run died before its first checkpoint: --resume says so (without it, the run starts over)
    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "early", "--num_epochs",
            "1", "--ss_frac_train", "0.05"]  # fmt: skip
    run_main(*args)
    for name in ("final.json", "checkpoint.pt", "checkpoint_prev.pt"):
        (tmp_path / "early" / name).unlink(missing_ok=True)
    proc = run_main(*args, "--resume", check=False)
    assert proc.returncode == 1 and "holds no readable checkpoint yet" in proc.stderr


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(synthetic_root, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", "")).endswith("checkpoint.pt.new.tmp"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second epoch's checkpoint: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    argv = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "full", "--mod_scheme",
            "LL-Cp", "--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--num_epochs", "3",
            "--num_workers", "0"]  # fmt: skip
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "intact" in err and "Traceback" not in err
    saved = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 1  # the first checkpoint, untouched
    assert not list((tmp_path / "full").glob("*.tmp")) and not (tmp_path / "full" / "checkpoint.pt.new").exists()
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes
    assert main.main(argv) == 0
    assert json.loads((tmp_path / "full" / "final.json").read_text())["epochs_run"] == 3
