"""Nothing lost, nothing misleading (issue 24): the run folder's record is whole or refused, a full disk anywhere ends
in one message and the same command goes on, float flags are checked in float32, the data checks compare files not
spellings, messages name the real cause (and their advice works when followed), parallel default names differ."""

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from test_run_folder import make_cfg, open_folder, write_checkpoint

import checkpoint
import config
import datasets
import files
import synthetic
import train

TORCH_FULL = (
    "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
)


def run_main(*argv):
    proc = conftest.run_main(*argv, check=False)
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture()
def started(tmp_path):
    """A run folder after two epochs whose checkpoints carry their log lines, and the log.jsonl they cover."""
    cfg = make_cfg(tmp_path)
    open_folder(cfg).release()
    write_checkpoint(cfg, "checkpoint_prev.pt", 1)
    write_checkpoint(cfg, "checkpoint.pt", 2)
    torch.save({"model": {}, "epoch": 2}, cfg.run_dir / "bestmodel.pt")
    (cfg.run_dir / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    return cfg


WHOLE = ['{"epoch": 1}\n', '{"epoch": 2}\n']


# ------------------------------------------------------------------------------ item 2: the record, whole or refused


def test_a_deleted_log_is_rebuilt_from_the_checkpoint(started):
    (started.run_dir / "log.jsonl").unlink()
    folder = open_folder(started)
    folder.release()
    assert folder.logged == WHOLE and "it is missing; rebuilt from the checkpoint (2 lines)" in folder.log_note


def test_a_cut_last_line_is_rebuilt_not_appended_to(started):
    (started.run_dir / "log.jsonl").write_text('{"epoch": 1}\n{"epo')
    folder = open_folder(started)
    folder.release()
    assert folder.logged == WHOLE and "its line 2 was cut short" in folder.log_note


def test_a_whole_log_resumes_without_a_note_and_later_lines_are_dropped(started):
    (started.run_dir / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')  # epoch 3 runs again
    folder = open_folder(started)
    folder.release()
    assert folder.logged == WHOLE and folder.log_note is None


@pytest.mark.parametrize("log", [None, '{"epoch": 1}\n{"epo', '{"epoch": 1}\n'])
def test_an_older_checkpoint_without_log_lines_refuses_a_log_with_a_gap(started, log):
    for name in checkpoint.CHECKPOINTS:
        payload = torch.load(started.run_dir / name, weights_only=True)
        del payload["log"]
        torch.save(payload, started.run_dir / name)
    path = started.run_dir / "log.jsonl"
    path.unlink() if log is None else path.write_text(log)
    with pytest.raises(checkpoint.RunFolderError, match="is not whole: .* older version .* Put back the whole log"):
        open_folder(started)
    path.write_text("".join(WHOLE))  # the advice: put back the whole log, and the same command resumes
    folder = open_folder(started)
    folder.release()
    assert folder.logged == WHOLE


@pytest.mark.slow  # trains
def test_a_deleted_or_cut_log_of_an_unfinished_run_resumes_to_the_whole_log(small_data, tmp_path):
    argv = common(small_data, tmp_path, "r", epochs=3)
    assert run_main(*argv)[0] == 0
    folder = tmp_path / "runs" / "r"
    reference = (folder / "log.jsonl").read_text().splitlines()
    for damage in ("delete", "cut"):
        (folder / "final.json").unlink()
        shutil.copy(folder / "checkpoint_prev.pt", folder / "checkpoint.pt")  # stopped after epoch 2
        log = folder / "log.jsonl"
        if damage == "delete":
            log.unlink()
        else:  # the line of epoch 2, which the checkpoint covers, cut short (and no line after it)
            log.write_text("\n".join(reference[:2])[:-30])
        code, out, _ = run_main(*argv)
        assert code == 0 and "rebuilt from the checkpoint (2 lines)" in out
        lines = log.read_text().splitlines()
        assert lines[:2] == reference[:2] and len(lines) == 3  # epochs 1-2 as written then, epoch 3 again
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


# ------------------------------------------------------------------------------------ item 4: a full disk anywhere


def test_a_full_disk_while_writing_config_json_leaves_a_folder_the_same_command_resumes(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    real = files.write_text_atomic

    def full(path, text):
        if Path(path).name == "config.json":
            raise files.DiskFull(Path(path))
        return real(path, text)

    monkeypatch.setattr(files, "write_text_atomic", full)
    with pytest.raises(checkpoint.RunFolderError, match=r"config.json: the disk is full\. Nothing half-written"):
        open_folder(cfg)
    monkeypatch.setattr(files, "write_text_atomic", real)  # space freed
    folder = open_folder(cfg)
    folder.release()
    assert json.loads((cfg.run_dir / "config.json").read_text()) == cfg.to_dict()


def test_a_folder_left_with_data_json_only_by_an_older_version_is_taken_as_a_started_run(tmp_path):
    cfg = make_cfg(tmp_path)
    open_folder(cfg).release()
    (cfg.run_dir / "config.json").unlink()  # what writing data.json first and then failing on config.json left
    (cfg.run_dir / "config.json.tmp").write_text("{")
    folder = open_folder(cfg)
    folder.release()
    assert (cfg.run_dir / "config.json").exists() and folder.resume_from is None


@pytest.mark.parametrize("free, expected", [(0, files.DiskFull), (2**40, OSError)])
def test_torch_saves_runtime_error_is_a_write_error_naming_the_file(tmp_path, monkeypatch, free, expected):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1}, path)

    def failing(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(files, "free_bytes", lambda folder: free)
    with pytest.raises(expected, match=f"could not write {re.escape(str(path))}: ") as raised:
        files.save_torch_atomic({"epoch": 2}, path)
    assert (raised.value.errno == errno.ENOSPC) == (free == 0)
    assert "the disk is full" in str(raised.value) if free == 0 else "PytorchStreamWriter" in str(raised.value)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}  # the previous file is intact


def test_a_full_disk_while_preparing_the_data_is_one_message(tmp_path, monkeypatch):
    def full(cfg):
        raise files.DiskFull(tmp_path / "data" / "formatted_train_labels_obs.npy")

    monkeypatch.setattr(datasets, "build_data", full)
    code, _, err = run_main("--save_path", str(tmp_path / "runs"), "--exp_name", "x")
    assert code == 1 and "The disk is full: could not write" in err and "formatted_train_labels_obs.npy" in err
    assert "run the same command again to continue" in err


@pytest.mark.slow  # trains
@pytest.mark.parametrize("what", ["checkpoint.pt.new.tmp", "log.jsonl.tmp", "final.json.tmp"])
def test_a_full_disk_in_a_torch_save_or_log_write_stops_cleanly_and_the_same_command_resumes(
    small_data, tmp_path, monkeypatch, what
):
    real_save, real_atomic = torch.save, files.write_atomic
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", "")).endswith(what):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError(TORCH_FULL)
        return real_save(obj, f, *args, **kwargs)

    def atomic(path, write):
        if Path(path).name + ".tmp" == what:
            calls["n"] += 1
            if calls["n"] == (2 if what == "log.jsonl.tmp" else 1):
                raise files.DiskFull(Path(path))
        return real_atomic(path, write)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(files, "write_atomic", atomic)
    monkeypatch.setattr(files, "free_bytes", lambda folder: 0)
    argv = common(small_data, tmp_path, "full", epochs=3)
    code, _, err = run_main(*argv)
    assert code == 1 and "the disk is full" in err and "The run folder keeps" in err and "intact" in err
    assert "run the same command again" in err
    assert not list((tmp_path / "runs" / "full").glob("*.tmp"))
    for module, name, real in ((torch, "save", real_save), (files, "write_atomic", real_atomic)):
        monkeypatch.setattr(module, name, real)  # space freed
    assert run_main(*argv)[0] == 0  # space freed: the same command goes on
    folder = tmp_path / "runs" / "full"
    assert [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((folder / "final.json").read_text())["epochs_run"] == 3


# ------------------------------------------------------------------------ item 5: float flags, negative pair values


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e39"], "--lr 1e+39 is infinite in float32"),
        (["--lr_mult", "1e39"], "--lr_mult 1e+39 is infinite in float32"),
        (["--lr", "1e38"], "times --lr_mult 10 (the head's learning rate) is infinite in float32"),
        (["--loss", "gr", "--gr_q2", "1e-300"], "--gr_q2 1e-300 is 0 (or loses its digits) in float32"),
        (["--loss", "gr", "--gr_w", "-1e308", "2"], "--gr_w -1e+308 2 is infinite in float32"),
        (["--boostlu_alpha", "1e39"], "--boostlu_alpha 1e+39 is infinite in float32"),
        (["--loss", "em", "--em_alpha", "-1e39"], "--em_alpha -1e+39 is infinite in float32"),
        (["--loss", "gr", "--gr_b", "-inf", "-2"], "--gr_b must be a finite number"),
    ],
)
def test_float_flags_are_checked_in_float32(tmp_path, argv, message):
    code, _, err = run_main(*argv, "--save_path", str(tmp_path))
    assert code == 2 and message in err and "expected 2 arguments" not in err


def test_pair_flags_take_negative_numbers_in_any_notation():
    cfg = config.parse_config(["--loss", "gr", "--gr_b", "-2.5e0", "-1E+0", "--exp_name", "x"])
    assert cfg.gr_b == (-2.5, -1.0)
    args = config.get_args_parser().parse_args(["--loss", "gr", "--gr_w", "-1e308", "-.5"])
    assert args.gr_w == [-1e308, -0.5]


# ------------------------------------------------------------------------ item 3: files, not spellings


@pytest.mark.parametrize("spelling", ["a/./x.png", "./a/x.png", "a//x.png", "a/b/../x.png", "a/x.png/"])
def test_the_overlap_check_compares_files_not_spellings(spelling):
    train_names = np.array(["a/x.png", "a/y.png"])
    found = datasets.repeated_name({"train": train_names, "test": np.array([spelling])})
    assert found is not None and found[1] == [("train", 0), ("test", 0)]
    assert datasets.repeated_name({"train": train_names, "val": np.array([spelling, "a/x.png"])})[1][0] == ("train", 0)
    assert datasets.repeated_name({"train": train_names, "test": np.array(["a/z.png"])}) is None


def test_a_test_image_spelled_differently_from_a_training_image_is_refused(small_data, tmp_path):
    test_names = np.load(small_data / "formatted_val_images.npy")
    train_name = str(np.load(small_data / "formatted_train_images.npy")[0])
    head, _, tail = train_name.rpartition("/")
    test_names = test_names.astype(f"<U{max(len(train_name) + 2, test_names.dtype.itemsize // 4)}")
    test_names[0] = f"{head}/./{tail}" if head else f"./{tail}"
    np.save(small_data / "formatted_val_images.npy", test_names)
    code, _, err = run_main(*common(small_data, tmp_path, "x"))
    assert code == 1 and "must not share an image" in err


# ------------------------------------------------------------------------ item 7: the real cause, advice that works


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--loss", "gr"], ["--gr_q2", "--gr_w", "--gr_sigma", "--lr"]),
        (["--mod_scheme", "LL-R", "--boostlu_alpha", "1e30"], ["--boostlu_alpha 1e+30", "--lr"]),
        (["--loss", "em", "--em_alpha", "1e20"], ["--em_alpha 1e+20"]),
    ],
)
def test_a_non_finite_loss_names_the_flags_of_the_method_in_use(argv, named):
    message = train.divergence_message(config.parse_config([*argv, "--exp_name", "x"]), 2, 25)
    assert all(flag in message for flag in named) and "--delta_rel" not in message
    assert "set on the command line" in message if "1e" in " ".join(argv) else True


@pytest.mark.slow  # trains
def test_the_advice_of_a_non_finite_loss_works_when_followed(small_data, tmp_path):
    code, _, err = run_main(*common(small_data, tmp_path, "nan"), "--lr", "1e30", "--mod_scheme", "AN")
    assert code == 1 and "set on the command line: --lr 1e+30" in err and "another --exp_name" in err
    assert run_main(*common(small_data, tmp_path, "nan2"), "--lr", "1e-4", "--mod_scheme", "AN")[0] == 0


@pytest.mark.parametrize("name", ["checkpoint.pt", "bestmodel.pt"])
def test_a_file_unreadable_for_lack_of_permission_is_called_a_permission_problem(started, monkeypatch, name):
    real = torch.load

    def load(path, *args, **kwargs):
        if Path(path).name == name:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(checkpoint.RunFolderError, match="permission denied .* not damaged") as raised:
        open_folder(started)
    assert "chmod u+r" in str(raised.value) and "damaged or" not in str(raised.value)
    monkeypatch.undo()  # the advice: give read permission, run the same command again
    open_folder(started).release()


def test_a_damaged_bestmodel_of_an_unfinished_run_is_named_before_training(started):
    good = (started.run_dir / "bestmodel.pt").read_bytes()
    (started.run_dir / "bestmodel.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(checkpoint.RunFolderError, match=r"bestmodel.pt cannot be read .* it is damaged") as raised:
        open_folder(started)
    assert "Invalid argument" not in str(raised.value) and "Put back a good copy" in str(raised.value)
    (started.run_dir / "bestmodel.pt").write_bytes(good)  # the advice, followed
    open_folder(started).release()


def test_an_all_zero_labels_file_is_named_and_the_advice_works(small_data, tmp_path):
    labels_path = small_data / "formatted_train_labels.npy"
    np.save(labels_path, np.zeros_like(np.load(labels_path)))
    code, _, err = run_main(*common(small_data, tmp_path, "x"))
    assert code == 1 and f"{labels_path} holds no positive label" in err
    listed = re.search(r"Delete (.+?) and run again", err).group(1).split(" and ")
    assert str(labels_path) in listed
    for path in listed:  # follow the advice
        os.remove(path)
    for path in small_data.glob("formatted_train_labels_obs*.npy"):
        assert np.load(path).any()  # no all-zero observed file was left to trip the next run
    datasets.build_data(SimpleConfig(small_data))


class SimpleConfig:
    """The fields build_data reads, at the command line's defaults."""

    def __init__(self, root: Path) -> None:
        self.dataset, self.data_root, self.val_frac, self.split_seed = "synthetic", str(root), 0.2, 1200
        self.ss_frac_train = self.ss_frac_val = 1.0
        self.ss_seed, self.train_set_variant, self.cache_dir = 999, "observed", None
        self.num_pos, self.num_neg, self.label_proportion = 1, 0, None


# ------------------------------------------------------------------------ item 8: parallel sweeps without --exp_name


def test_runs_started_in_the_same_second_get_distinct_default_names(monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    names = set()
    for pid in (4242, 4243):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        names.add(config.parse_config(["--lr", "0.001"]).exp_name)
    assert len(names) == 2 and all(n.startswith("synthetic_LL-R_d1_s0_20250101-120000") for n in names)


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture()
def small_data(tmp_path, monkeypatch):
    """A small synthetic dataset in the real on-disk form, to break in different ways."""
    monkeypatch.setattr(synthetic, "NUM_TRAIN", 40)
    monkeypatch.setattr(synthetic, "NUM_TEST", 10)
    return synthetic.ensure_dataset(tmp_path / "data")


def common(root, tmp_path, name, epochs=1):
    return ["--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--exp_name", name,
            "--num_epochs", str(epochs), "--use_pretrained", "false", "--num_workers", "0"]  # fmt: skip


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("not a write error"), ValueError("bad value")])
def test_an_interrupted_atomic_write_leaves_nothing_beside_the_file(tmp_path, error):
    """A Ctrl-C (or any error) inside the write goes on unchanged, and neither a half-written temporary file nor a
    changed target is left: the file that was there before is intact."""
    target = tmp_path / "final.json"
    target.write_text("before")

    def write(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        files.write_atomic(target, write)
    assert target.read_text() == "before" and sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]
