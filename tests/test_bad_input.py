"""Every row of README's bad-input table: a one-paragraph message that says what is wrong and what to do, a non-zero
exit status, and no traceback. (SIGINT, a full disk and a run folder of another config: tests/test_resume.py; the
run folder's lock and checks before a resume: tests/test_run_folder.py.)"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import numpy as np
import pytest
from conftest import REPO

import checkpoint
import config
import datasets
import files
import loaders
import main
import synthetic


def run_main(*argv):
    proc = conftest.run_main(*argv, check=False)
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--mod_scheme", "LL-Z"], "invalid choice: 'LL-Z'"),
        (["--loss", "focal"], "invalid choice: 'focal'"),
        (["--delta_rel", "-1"], "--delta_rel must lie in [0, 100]"),
        (["--delta_rel", "1000"], "--delta_rel must lie in [0, 100]"),
        (["--bsize", "0"], "--bsize must be a positive integer"),
        (["--num_epochs", "0"], "--num_epochs must be a positive integer"),
    ],
)
def test_bad_flags_exit_2_with_argparse_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage:" in err and message in err and "Traceback" not in err


@pytest.fixture()
def small_data(tmp_path, monkeypatch):
    """A small synthetic dataset in the real on-disk form, to break in different ways."""
    monkeypatch.setattr(synthetic, "NUM_TRAIN", 40)
    monkeypatch.setattr(synthetic, "NUM_TEST", 10)
    root = synthetic.ensure_dataset(tmp_path / "data")
    return root


def common(root, tmp_path, name):
    return ["--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--exp_name", name, "--num_epochs", "1",
            "--use_pretrained", "false", "--num_workers", "0"]  # fmt: skip


def test_missing_data_folder(tmp_path):
    code, _, err = run_main("--dataset", "cub", "--data_root", str(tmp_path / "none"))
    assert code == 1 and "No formatted cub data" in err and "data/README.md" in err


def test_formatted_files_whose_lengths_disagree(small_data, tmp_path):
    np.save(small_data / "formatted_val_images.npy", np.load(small_data / "formatted_val_images.npy")[:5])
    code, _, err = run_main(*common(small_data, tmp_path, "x"))
    assert code == 1 and "The formatted files disagree" in err and "formatted_val_labels.npy" in err


def test_labels_not_in_the_expected_values(small_data, tmp_path):
    labels = np.load(small_data / "formatted_train_labels.npy")
    labels[3, 2] = 0.5
    np.save(small_data / "formatted_train_labels.npy", labels)
    code, _, err = run_main(*common(small_data, tmp_path, "x"))
    assert code == 1 and "holds values other than (0, 1)" in err


def test_missing_images(small_data, tmp_path):
    (small_data / "images" / "train" / "train_000007.png").unlink()
    code, _, err = run_main(*common(small_data, tmp_path, "x"))
    assert code == 1 and "1 of 50 listed images are missing" in err and "train_000007.png" in err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.slow  # trains
@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_undecodable_image_names_the_file(small_data, tmp_path, workers):
    (small_data / "images" / "test" / "test_000003.png").write_bytes(b"not a png")
    argv = common(small_data, tmp_path, f"x{workers}")
    argv[argv.index("--num_workers") + 1] = workers
    code, _, err = run_main(*argv)
    assert code == 1 and "Cannot decode image" in err and "test_000003.png" in err


@pytest.mark.slow  # trains
def test_images_without_positives_are_kept_and_counted(small_data, tmp_path):
    labels = np.load(small_data / "formatted_train_labels.npy")
    labels[:4] = 0  # four images of the official train split with no positive label
    np.save(small_data / "formatted_train_labels.npy", labels)
    code, out, _ = run_main(*common(small_data, tmp_path, "x"))
    assert code == 0 and "images without any positive label (kept, as the official tools keep them)" in out


@pytest.mark.slow  # trains
def test_a_non_finite_loss_stops_the_run(small_data, tmp_path):
    code, _, err = run_main(*common(small_data, tmp_path, "nan"), "--lr", "1e30", "--mod_scheme", "AN")
    assert code == 1 and "became NaN or infinite" in err and "--lr 1e+30" in err and "learning rate down" in err


def test_cuda_asked_for_without_a_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main("--device", "cuda", "--save_path", str(tmp_path))
    assert code == 1 and "sees no CUDA device" in err


def test_a_cuda_graph_asked_for_on_a_cpu_stops_before_anything_is_written(tmp_path):
    code, _, err = run_main("--device", "cpu", "--cuda_graph", "on", "--save_path", str(tmp_path))
    assert code == 1 and "--cuda_graph on needs a CUDA device (this run uses cpu)" in err and "auto or off" in err
    assert not list(tmp_path.iterdir())  # no run folder


def test_debug_shows_the_traceback(tmp_path):
    import datasets

    with pytest.raises(datasets.DataError):
        main.main(["--dataset", "cub", "--data_root", str(tmp_path / "none"), "--debug"])


# --- Ctrl-C, the run folder, files in the way ------------------------------------------------------------------------


def on_synthetic(root, save, name="x", *extra):
    return ["--data_root", str(root), "--save_path", str(save), "--exp_name", name, "--num_epochs", "1",
            "--num_workers", "0", "--ss_frac_train", "0.05", "--ss_frac_val", "0.05", *extra]  # fmt: skip


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.slow  # runs main.py or several processes
@pytest.mark.parametrize("module, where", [(datasets, "build_data"), (loaders, "build_disk_cache")])
def test_ctrl_c_before_training_exits_130_with_a_message(synthetic_root, tmp_path, monkeypatch, module, where):
    monkeypatch.setattr(module, where, interrupt)  # Ctrl-C while the data is prepared, or the disk cache built
    code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path, "x", "--cache", "disk"))
    assert code == 130 and "Interrupted (Ctrl-C)" in err and "run the same command again" in err


@pytest.mark.slow  # generates the synthetic data
def test_ctrl_c_with_debug_shows_the_traceback(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "build_data", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main.main([*on_synthetic(synthetic_root, tmp_path), "--debug"])


@pytest.mark.slow
@pytest.mark.parametrize("after", [0.0, 0.3])
def test_ctrl_c_while_main_py_imports_torch(tmp_path, after):
    """Importing torch takes a second or more: a Ctrl-C then ends the command with the message and 130, neither a
    traceback from inside an import nor ignored. Sent ``after`` seconds once torch's library is loaded (main.py's
    first imports are done by then, and torch's Python modules still load)."""
    cmd = [sys.executable, str(REPO / "main.py"), "--data_root", str(tmp_path / "d"), "--save_path", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps, start = Path(f"/proc/{proc.pid}/maps"), time.time()
    while "libtorch" not in maps.read_text(errors="replace"):
        assert proc.poll() is None and time.time() - start < 120
        time.sleep(0.005)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # (on a machine that imports torch faster than that, the Ctrl-C meets the run itself, with its own message)
    assert proc.returncode == 130 and "Interrupted (Ctrl-C)" in err and "Traceback" not in err, err[-2000:]
    if "while starting: nothing was written" in err:
        assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it(synthetic_root, tmp_path):
    """`python main.py ... &` in a script starts it with Ctrl-C ignored: Ctrl-C in the terminal stops the script, not
    the runs. main.py must not install a handler of its own there."""
    cmd = [sys.executable, str(REPO / "main.py"), "--data_root", str(synthetic_root), "--save_path", str(tmp_path)]
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=ignore)
    try:
        maps, start = Path(f"/proc/{proc.pid}/maps"), time.time()
        while "libtorch" not in maps.read_text(errors="replace"):
            assert proc.poll() is None and time.time() - start < 120
            time.sleep(0.005)
        for _ in range(2):  # during the imports, and after them
            proc.send_signal(signal.SIGINT)
            time.sleep(2.0)
        assert proc.poll() is None  # still running
        while not list(tmp_path.glob("*/log.jsonl")):  # and in training, where the first Ctrl-C asks for a stop
            assert proc.poll() is None and time.time() - start < 300
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(2.0)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_ctrl_c_while_the_synthetic_data_is_generated(tmp_path):
    root = tmp_path / "fresh"
    cmd = [sys.executable, str(REPO / "main.py"), "--data_root", str(root), "--save_path", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (root / "images").exists():  # generation has begun
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < 120
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_a_save_path_that_is_a_file(synthetic_root, tmp_path):
    (tmp_path / "afile").write_text("")
    code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path / "afile"))
    assert code == 1 and f"Cannot create or write the run folder {tmp_path / 'afile' / 'x'}" in err
    assert "is a file, not a folder" in err and "--save_path" in err


def test_a_data_root_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    code, _, err = run_main(*on_synthetic(tmp_path / "afile", tmp_path / "runs"))
    assert code == 1 and f"Cannot use {tmp_path / 'afile'}" in err and "Check --data_root" in err


def test_a_cache_dir_that_is_a_file_names_cache_dir(synthetic_root, tmp_path):
    (tmp_path / "afile").write_text("")
    argv = [*on_synthetic(synthetic_root, tmp_path / "runs"), "--cache_dir", str(tmp_path / "afile"), "--num_pos", "2"]
    code, _, err = run_main(*argv)
    assert code == 1 and f"Cannot use {tmp_path / 'afile'}" in err and f"Check --cache_dir {tmp_path / 'afile'}" in err


def test_a_too_long_folder_name(synthetic_root, tmp_path):
    code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path / ("n" * 300)))
    assert code == 1 and "File name too long" in err and "a folder name in it is too long: shorten --save_path" in err


def test_a_read_only_save_path(synthetic_root, tmp_path, monkeypatch):
    """As root, chmod does not stop writes: the refusal of a read-only file system is simulated."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path / "ro"))
    assert code == 1 and "Read-only file system" in err and "is not writable here: choose a writable --save_path" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_save_path_without_write_permission(synthetic_root, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path / "ro"))
    assert code == 1 and "is not writable here: choose a writable --save_path" in err


def test_a_config_json_that_is_not_json(synthetic_root, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"lr": 0.001, "ar')
    code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path))
    assert code == 1 and "config.json is not valid JSON" in err and "another --exp_name" in err


def test_a_run_folder_in_use(synthetic_root, tmp_path):
    (tmp_path / "x").mkdir()
    with files.lock(tmp_path / "x" / checkpoint.LOCK_NAME, "The run folder"):
        code, _, err = run_main(*on_synthetic(synthetic_root, tmp_path))
    assert code == 1 and "is in use by another process" in err and "wait for it to finish" in err


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_two_unreadable_checkpoints_are_refused(synthetic_root, tmp_path, resume):
    argv = on_synthetic(synthetic_root, tmp_path, "x", *resume)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(config.parse_config(argv).to_json())
    for name in ("checkpoint.pt", "checkpoint_prev.pt"):
        (tmp_path / "x" / name).write_bytes(b"not a checkpoint")
    code, out, err = run_main(*argv)
    assert code == 1 and "No checkpoint in" in err and "move that folder away" in err and "epoch" not in out


@pytest.mark.slow  # trains once with the fix
def test_a_last_batch_of_one_image_that_batchnorm_cannot_take_is_refused_up_front(small_data, tmp_path):
    # 32 training images, --bsize 31: the last batch holds one image, and ResNet-18 at 32x32 ends in 1x1 feature maps
    argv = [*common(small_data, tmp_path, "one"), "--arch", "resnet18", "--bsize", "31"]
    code, _, err = run_main(*argv)
    assert code == 1 and "--bsize 31 leaves a last training batch of one image" in err and "--bsize (e.g. 32)" in err
    assert not (tmp_path / "runs" / "one").exists()  # refused before the run folder is made
    code, _, _ = run_main(*common(small_data, tmp_path, "one"), "--arch", "resnet18", "--bsize", "8")
    assert code == 0


@pytest.mark.slow  # trains
def test_a_run_folder_deleted_while_training_stops_with_a_message(small_data, tmp_path, monkeypatch):
    import shutil

    import train

    real = train.train_one_epoch

    def delete_in_epoch_2(cfg, *args, epoch, **kwargs):
        if epoch == 2:
            shutil.rmtree(cfg.run_dir)
        return real(cfg, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", delete_in_epoch_2)
    argv = common(small_data, tmp_path, "gone")
    argv[argv.index("--num_epochs") + 1] = "3"
    code, _, err = run_main(*argv)
    assert code == 1 and "was deleted or moved while the run was training" in err
