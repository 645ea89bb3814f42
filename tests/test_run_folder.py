"""The run folder: its lock, the checks before a resume (config, data, checkpoints, bestmodel.pt) and the messages
when it cannot be used. Checkpoints here are small stand-ins: these checks read only their progress and config."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

import checkpoint
import config
import files
import main


def make_cfg(tmp_path, *extra: str) -> config.Config:
    return config.parse_config(["--data_root", str(tmp_path / "data"), "--save_path", str(tmp_path / "runs"),
                                "--exp_name", "r", "--num_workers", "0", *extra])  # fmt: skip


def open_folder(cfg, resume=False, fingerprint="f1", lock=True) -> checkpoint.RunFolder:
    return checkpoint.open_run_folder(
        cfg, resume=resume, not_training=config.NOT_TRAINING_SETTINGS, data_fingerprint=fingerprint, lock=lock
    )


def write_checkpoint(cfg, name: str, epoch: int, best_epoch: int | None = None, **config_changes) -> None:
    progress = {"epoch": epoch, "best_val_map": 50.0, "best_epoch": epoch if best_epoch is None else best_epoch,
                "early_stopped": False, "log_lines": epoch}  # fmt: skip
    payload = {"progress": progress, "model": {}, "optimizer": {}, "labels": {}, "rng": {},
               "config": {**cfg.to_dict(), **config_changes},
               "log": [json.dumps({"epoch": e}) + "\n" for e in range(1, epoch + 1)]}  # fmt: skip
    torch.save(payload, cfg.run_dir / name)


@pytest.fixture()
def started(tmp_path):
    """A run folder after two epochs: config.json, data.json, both checkpoints and bestmodel.pt."""
    cfg = make_cfg(tmp_path)
    open_folder(cfg).release()
    write_checkpoint(cfg, "checkpoint_prev.pt", 1)
    write_checkpoint(cfg, "checkpoint.pt", 2)
    torch.save({"model": {}, "epoch": 2}, cfg.run_dir / "bestmodel.pt")
    return cfg


def test_a_new_run_folder_holds_config_and_data_json(tmp_path):
    cfg = make_cfg(tmp_path)
    folder = open_folder(cfg)
    folder.release()
    assert json.loads((cfg.run_dir / "config.json").read_text()) == cfg.to_dict()
    data = json.loads((cfg.run_dir / "data.json").read_text())
    assert data == {"data_root": os.path.realpath(tmp_path / "data"), "fingerprint": "f1"}
    assert folder.resume_from is None and folder.finished is None


def test_resume_reads_the_last_checkpoint(started, capsys):
    folder = open_folder(started)
    folder.release()
    assert folder.resume_file.name == "checkpoint.pt" and folder.resume_from["progress"]["epoch"] == 2
    assert "warning" not in capsys.readouterr().out


def test_a_run_that_stopped_before_it_trained_starts_afresh_with_other_flags(tmp_path, capsys):
    """A run that failed during its setup (weights unavailable, say) left config.json and data.json only: the fix its
    message suggests (other flags) starts the run, --resume says there is nothing to resume; with a log or a
    checkpoint beside them, other flags are still refused."""
    open_folder(make_cfg(tmp_path)).release()
    fixed = make_cfg(tmp_path, "--use_pretrained", "false")
    with pytest.raises(checkpoint.RunFolderError, match="no run to resume in .* stopped before it trained"):
        open_folder(fixed, resume=True)
    folder = open_folder(fixed)
    folder.release()
    assert "stopped before it trained" in capsys.readouterr().out and folder.resume_from is None
    assert json.loads((fixed.run_dir / "config.json").read_text()) == fixed.to_dict()
    (fixed.run_dir / "log.jsonl").write_text("{}\n")  # an epoch was logged: the run is one to keep
    with pytest.raises(checkpoint.RunFolderError, match="different config"):
        open_folder(make_cfg(tmp_path))


# --- upgrades: a field missing from an older config.json is read as its default ---------------------------------


def test_a_missing_field_counts_as_its_default(tmp_path):
    cfg = make_cfg(tmp_path)
    defaults = checkpoint._defaults(cfg)
    current = cfg.to_dict()
    older = {k: v for k, v in current.items() if k not in ("boostlu_alpha", "ls_coef")}
    assert checkpoint._config_differences(older, current, config.NOT_TRAINING_SETTINGS, defaults) == []
    # a field missing from the saved config while this run sets it to something else than the default
    boosted = {**current, "boostlu_alpha": 5.0}
    assert checkpoint._config_differences(older, boosted, config.NOT_TRAINING_SETTINGS, defaults) == ["boostlu_alpha"]
    # a field without a default (lr) cannot be guessed: missing is a difference
    no_lr = {k: v for k, v in current.items() if k != "lr"}
    assert checkpoint._config_differences(no_lr, current, config.NOT_TRAINING_SETTINGS, defaults) == ["lr"]
    # settings that do not change training may differ
    moved = {**current, "num_workers": 7, "cache": "disk"}
    assert checkpoint._config_differences(moved, current, config.NOT_TRAINING_SETTINGS, defaults) == []


@pytest.mark.slow
def test_checkpoint_py_does_not_import_config():
    code = "import sys, checkpoint; print('config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- which checkpoint a resume uses, and when none can be used -------------------------------------------------


def test_an_unreadable_checkpoint_falls_back_and_the_message_names_the_previous_one(started, capsys):
    (started.run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    folder = open_folder(started)
    folder.release()
    assert folder.resume_file.name == "checkpoint_prev.pt" and folder.resume_from["progress"]["epoch"] == 1
    out = capsys.readouterr().out
    assert "checkpoint.pt cannot be read" in out and "resuming from checkpoint_prev.pt instead" in out


def test_a_checkpoint_of_another_config_is_skipped_for_the_previous_one(started, capsys):
    write_checkpoint(started, "checkpoint.pt", 2, arch="resnet18")  # e.g. copied from a run with another --arch
    folder = open_folder(started)
    folder.release()
    assert folder.resume_file.name == "checkpoint_prev.pt"
    out = capsys.readouterr().out
    assert "checkpoint.pt was written with another config (arch 'resnet18' there, 'smallcnn' here)" in out
    assert "resuming from checkpoint_prev.pt" in out


@pytest.mark.parametrize("resume", [False, True])
def test_two_unreadable_checkpoints_are_refused_not_restarted(started, resume):
    for name in ("checkpoint.pt", "checkpoint_prev.pt"):
        (started.run_dir / name).write_bytes(b"garbage")
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(started, resume=resume)
    message = str(err.value)
    assert "No checkpoint in" in message and "checkpoint.pt cannot be read" in message
    assert "checkpoint_prev.pt cannot be read" in message and "move that folder away" in message
    files.acquire_lock(started.run_dir / checkpoint.LOCK_NAME, "x").release()  # a refusal frees the lock


def test_a_hand_edited_config_json_is_refused_naming_the_keys(started):
    """config.json edited (and the same flag given): the checkpoints hold the old value; resuming would mix both."""
    saved = json.loads((started.run_dir / "config.json").read_text())
    saved["lr"] = 0.005
    (started.run_dir / "config.json").write_text(json.dumps(saved))
    edited = make_cfg(started.run_dir.parent.parent, "--lr", "0.005")
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(edited)
    message = str(err.value)
    assert "lr 0.001 there, 0.005 here" in message and "config.json was edited" in message


def test_a_missing_bestmodel_is_refused_before_training(started):
    (started.run_dir / "bestmodel.pt").unlink()
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(started)
    assert "bestmodel.pt is missing" in str(err.value) and "epoch 2" in str(err.value)


def test_no_bestmodel_is_needed_before_a_best_epoch(tmp_path):
    cfg = make_cfg(tmp_path)
    open_folder(cfg).release()
    write_checkpoint(cfg, "checkpoint.pt", 1, best_epoch=0)
    open_folder(cfg).release()


def test_a_config_json_that_is_not_json_is_refused(started):
    (started.run_dir / "config.json").write_text('{"lr": 0.001,')
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(started)
    assert "config.json is not valid JSON" in str(err.value)


def test_a_damaged_final_json_is_refused_with_the_fix(started):
    (started.run_dir / "final.json").write_text("")
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(started)
    assert "final.json is not valid JSON" in str(err.value) and "Delete final.json" in str(err.value)


# --- the data a resume must match ---------------------------------------------------------------------------------


def test_another_data_root_is_refused(started, tmp_path):
    other = config.parse_config(["--data_root", str(tmp_path / "other"), "--save_path", str(tmp_path / "runs"),
                                 "--exp_name", "r", "--num_workers", "0"])  # fmt: skip
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(other, fingerprint="f2")
    assert "fingerprint" in str(err.value)
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(other, fingerprint=None)
    assert f"not --data_root {tmp_path / 'other'}" in str(err.value)


def test_the_same_files_moved_to_another_data_root_resume(started, tmp_path, capsys):
    other = config.parse_config(["--data_root", str(tmp_path / "moved"), "--save_path", str(tmp_path / "runs"),
                                 "--exp_name", "r", "--num_workers", "0"])  # fmt: skip
    open_folder(other, fingerprint="f1").release()
    assert "moved from" in capsys.readouterr().out
    assert json.loads((started.run_dir / "data.json").read_text())["data_root"] == os.path.realpath(tmp_path / "moved")


def test_other_formatted_files_in_the_same_data_root_are_refused(started):
    with pytest.raises(checkpoint.RunFolderError) as err:
        open_folder(started, fingerprint="f2")
    assert "other formatted data" in str(err.value)


def test_an_old_run_folder_without_data_json_is_accepted_and_checked_on_its_data_root(started, tmp_path):
    (started.run_dir / "data.json").unlink()
    open_folder(started, fingerprint="f9").release()  # accepted; the fingerprint is recorded from now on
    assert json.loads((started.run_dir / "data.json").read_text())["fingerprint"] == "f9"
    (started.run_dir / "data.json").unlink()
    other = config.parse_config(["--data_root", str(tmp_path / "other"), "--save_path", str(tmp_path / "runs"),
                                 "--exp_name", "r", "--num_workers", "0"])  # fmt: skip
    with pytest.raises(checkpoint.RunFolderError):
        open_folder(other)


# --- the lock ---------------------------------------------------------------------------------------------------

HOLD = (
    "import files, sys, time; held = files.acquire_lock(sys.argv[1], 'x'); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture()
def holder():
    """Start a process that takes a lock and keeps it; kill it at the end."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_lock_held_by_this_process_refuses_a_second_one(tmp_path):
    path = tmp_path / "x.lock"
    with files.lock(path, "The thing"):
        with pytest.raises(files.LockError) as err:
            files.acquire_lock(path, "The thing")
        assert f"pid {os.getpid()} on host" in str(err.value) and f"lock file {path}" in str(err.value)
    files.acquire_lock(path, "The thing").release()  # freed at the end of the block


@pytest.mark.slow
def test_a_run_folder_in_use_by_another_process_is_refused(started, holder):
    proc = holder(started.run_dir / checkpoint.LOCK_NAME)
    with pytest.raises(files.LockError) as err:
        open_folder(started)
    message = str(err.value)
    assert message.startswith(f"The run folder {started.run_dir} is in use by another process (pid {proc.pid} on host")
    assert "wait for it to finish" in message


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over(started, holder):
    proc = holder(started.run_dir / checkpoint.LOCK_NAME)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = open_folder(started)
    assert (started.run_dir / checkpoint.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    folder.release()


def test_the_run_folder_lock_is_held_until_released_and_ignored_as_content(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / checkpoint.LOCK_NAME).write_text("")  # a lock file alone: a run that died before config.json
    folder = open_folder(cfg)
    with pytest.raises(files.LockError):
        open_folder(cfg)
    open_folder(cfg, lock=False)  # torchrun's other processes: no lock of their own
    folder.release()
    open_folder(cfg).release()


@pytest.mark.slow
def test_a_second_identical_command_is_refused_while_the_first_trains(synthetic_root, tmp_path, capsys):
    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "twice", "--num_epochs",
            "20", "--ss_frac_train", "0.05", "--ss_frac_val", "0.05", "--num_workers", "0"]  # fmt: skip
    first = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        start = time.time()
        while not (tmp_path / "twice" / "config.json").exists():  # written once the lock is held
            assert first.poll() is None and time.time() - start < 300
            time.sleep(0.05)
        assert main.main(args) == 1
        err = capsys.readouterr().err
        assert "is in use by another process" in err and f"pid {first.pid}" in err and "Traceback" not in err
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
