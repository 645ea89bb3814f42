"""Every row of README's bad-input table: a one-paragraph message that says what is wrong and what to do, a non-zero
exit status, and no traceback. (SIGINT, a full disk and a run folder of another config: tests/test_resume.py.)"""

import numpy as np
import pytest

import main
import synthetic


def run_main(capsys, *argv):
    code = main.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--mod_scheme", "LL-Z"], "invalid choice: 'LL-Z'"),
        (["--loss", "focal"], "invalid choice: 'focal'"),
        (["--delta_rel", "-1"], "--delta_rel is in percent per epoch and must lie in [0, 100]"),
        (["--delta_rel", "1000"], "--delta_rel is in percent per epoch and must lie in [0, 100]"),
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


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = run_main(capsys, "--dataset", "cub", "--data_root", str(tmp_path / "none"))
    assert code == 1 and "No formatted cub data" in err and "data/README.md" in err


def test_formatted_files_whose_lengths_disagree(small_data, tmp_path, capsys):
    np.save(small_data / "formatted_val_images.npy", np.load(small_data / "formatted_val_images.npy")[:5])
    code, _, err = run_main(capsys, *common(small_data, tmp_path, "x"))
    assert code == 1 and "The formatted files disagree" in err and "formatted_val_labels.npy" in err


def test_labels_not_in_the_expected_values(small_data, tmp_path, capsys):
    labels = np.load(small_data / "formatted_train_labels.npy")
    labels[3, 2] = 0.5
    np.save(small_data / "formatted_train_labels.npy", labels)
    code, _, err = run_main(capsys, *common(small_data, tmp_path, "x"))
    assert code == 1 and "holds values other than (0, 1)" in err


def test_missing_images(small_data, tmp_path, capsys):
    (small_data / "images" / "train" / "train_000007.png").unlink()
    code, _, err = run_main(capsys, *common(small_data, tmp_path, "x"))
    assert code == 1 and "1 of 50 listed images are missing" in err and "train_000007.png" in err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_undecodable_image_names_the_file(small_data, tmp_path, capsys, workers):
    (small_data / "images" / "test" / "test_000003.png").write_bytes(b"not a png")
    argv = common(small_data, tmp_path, f"x{workers}")
    argv[argv.index("--num_workers") + 1] = workers
    code, _, err = run_main(capsys, *argv)
    assert code == 1 and "Cannot decode image" in err and "test_000003.png" in err


def test_images_without_positives_are_kept_and_counted(small_data, tmp_path, capsys):
    labels = np.load(small_data / "formatted_train_labels.npy")
    labels[:4] = 0  # four images of the official train split with no positive label
    np.save(small_data / "formatted_train_labels.npy", labels)
    code, out, _ = run_main(capsys, *common(small_data, tmp_path, "x"))
    assert code == 0 and "images without any positive label (kept, as the official tools keep them)" in out


def test_a_non_finite_loss_stops_the_run(small_data, tmp_path, capsys):
    code, _, err = run_main(capsys, *common(small_data, tmp_path, "nan"), "--lr", "1e30", "--mod_scheme", "AN")
    assert code == 1 and "became NaN or infinite" in err and "Lower --lr" in err


def test_cuda_asked_for_without_a_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(capsys, "--device", "cuda", "--save_path", str(tmp_path))
    assert code == 1 and "sees no CUDA device" in err


def test_debug_shows_the_traceback(tmp_path):
    import datasets

    with pytest.raises(datasets.DataError):
        main.main(["--dataset", "cub", "--data_root", str(tmp_path / "none"), "--debug"])
