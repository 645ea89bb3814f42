"""The embedded synthetic dataset: deterministic, in the real on-disk form, with the intended label statistics."""

import json

import numpy as np
import pytest

import synthetic
from datasets import DataError


def generate_small(root, monkeypatch):
    monkeypatch.setattr(synthetic, "NUM_TRAIN", 40)
    monkeypatch.setattr(synthetic, "NUM_TEST", 10)
    return synthetic.ensure_dataset(root)


def test_generation_is_deterministic_and_in_the_formatted_layout(tmp_path, monkeypatch):
    a, b = generate_small(tmp_path / "a", monkeypatch), generate_small(tmp_path / "b", monkeypatch)
    for phase, count in (("train", 40), ("val", 10)):
        images_a = np.load(a / f"formatted_{phase}_images.npy")
        labels_a = np.load(a / f"formatted_{phase}_labels.npy")
        assert images_a.shape == (count,) and labels_a.shape == (count, 16)
        np.testing.assert_array_equal(labels_a, np.load(b / f"formatted_{phase}_labels.npy"))
        for name in images_a:
            assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()


def test_existing_dataset_is_reused_and_a_stale_one_rebuilt(tmp_path, monkeypatch, capsys):
    root = generate_small(tmp_path, monkeypatch)
    stamp = (root / "formatted_train_labels.npy").stat().st_mtime_ns
    synthetic.ensure_dataset(root)
    assert (root / "formatted_train_labels.npy").stat().st_mtime_ns == stamp
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    capsys.readouterr()
    synthetic.ensure_dataset(root)
    assert "regenerating" in capsys.readouterr().out


def test_label_statistics():
    rng = np.random.default_rng(0)
    drawn = [synthetic.draw_multilabel_image(rng) for _ in range(600)]
    labels = np.stack([d[1] for d in drawn])
    assert drawn[0][0].shape == (32, 32, 3) and drawn[0][0].dtype == np.uint8
    per_image = labels.sum(1)
    assert per_image.min() == 1 and per_image.max() == 4
    assert 2.2 < per_image.mean() < 2.8  # 2.5 expected from the 1-4 object probabilities
    frequency = labels.mean(0)
    assert frequency.min() > 0.03 and frequency.max() < 0.4  # rare and common classes, none absent
    # co-occurrence: classes favoured by the same scene appear together more often than independence predicts
    a, b = synthetic.SCENES[0][0], synthetic.SCENES[0][1]
    assert (labels[:, a] * labels[:, b]).mean() > frequency[a] * frequency[b]


def test_pretraining_shapes_are_disjoint_from_the_classes():
    assert not set(synthetic.PRETRAIN_SHAPES) & set(synthetic.MULTILABEL_SHAPES)
    assert len(synthetic.PRETRAIN_SHAPES) == len(synthetic.MULTILABEL_SHAPES) == 16


def test_a_missing_formatted_file_or_a_broken_manifest_regenerates_everything_derived(tmp_path, monkeypatch, capsys):
    root = generate_small(tmp_path, monkeypatch)
    labels = np.load(root / "formatted_val_labels.npy")
    np.save(root / "formatted_train_labels_obs_p2n1.npy", np.zeros((40, 16)))  # a regime's observed labels
    (root / "formatted_val_labels.npy").unlink()
    capsys.readouterr()
    synthetic.ensure_dataset(root)
    assert "regenerating" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(root / "formatted_val_labels.npy"), labels)
    assert not (root / "formatted_train_labels_obs_p2n1.npy").exists()  # observed labels of the old data: gone
    (root / "synthetic.json").write_text("{not json")
    synthetic.ensure_dataset(root)
    assert json.loads((root / "synthetic.json").read_text()) == synthetic._manifest()


def test_another_datasets_folder_is_refused_and_left_as_it_was(tmp_path, monkeypatch):
    """The default --dataset on another dataset's folder (no synthetic.json): nothing replaced, nothing deleted."""
    labels = np.ones((3, 20), dtype=np.int8)
    np.save(tmp_path / "formatted_train_labels.npy", labels)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "pixels.u8").write_bytes(b"x")
    with pytest.raises(DataError, match=r"cache, formatted_train_labels.npy but no synthetic.json.*--dataset"):
        generate_small(tmp_path, monkeypatch)
    np.testing.assert_array_equal(np.load(tmp_path / "formatted_train_labels.npy"), labels)
    assert (tmp_path / "cache" / "pixels.u8").read_bytes() == b"x"
    assert not (tmp_path / "synthetic.json").exists() and not (tmp_path / "images").exists()


def test_an_interrupted_generation_is_redone_and_a_folder_with_only_other_files_is_used(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("the synthetic data go here")  # as in the repository's data/synthetic
    written = []

    def interrupted(root, split, phase, count, rng):
        written.append(phase)
        np.save(root / f"formatted_{phase}_labels.npy", np.zeros((1, 16)))
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_small(tmp_path, monkeypatch)
    assert written == ["train"] and "generating" in json.loads((tmp_path / "synthetic.json").read_text())
    monkeypatch.undo()
    root = generate_small(tmp_path, monkeypatch)  # marked as the generator's: redone, not refused
    assert synthetic._is_current(root) and np.load(root / "formatted_train_labels.npy").shape == (40, 16)
