"""Unusual and bad data inputs: the partial-label regimes, where derived files go (read-only data roots, --cache_dir),
the data-root lock, label files of any numeric dtype, observed-label files that do not match, image modes, and every
damaged file: each works correctly or stops with a DataError that names the file or flag, says what is wrong and what
to do. Fixtures are made here, in tmp_path, in the datasets' real raw formats (tests/fixtures_raw.py)."""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BUILT_IN_DATASETS, REPO
from fixtures_raw import (
    COCO,
    NUSWIDE_TRAIN_NAMES,
    make_coco,
    make_cub,
    make_nuswide,
    make_openimages,
    make_pascal,
    nuswide_labels,
)
from PIL import Image

import datasets
import files
import formats
import label_rules
import loaders
import main
import prepare_data
import resize
import synthetic
from datasets import DataError
from label_rules import Regime

# ----------------------------------------------------------------------------------------------------------- helpers


def cfg_for(dataset: str, root: Path, **overrides) -> SimpleNamespace:
    """The fields build_data reads, at their command-line defaults."""
    values = dict(
        dataset=dataset, data_root=str(root), val_frac=0.2, split_seed=1200, ss_frac_train=1.0, ss_frac_val=1.0,
        ss_seed=999, train_set_variant="observed",
    )  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


def official_observe(full: np.ndarray, num_pos: int, num_neg: int, seed: int = 1200) -> np.ndarray:
    """The official generator written out the plain way: 0 -> -1, then per row, with one RandomState for the file,
    shuffle the positives' indices and observe the first num_pos, then shuffle the negatives' and observe num_neg."""
    signed = full.astype(np.float64).copy()
    signed[signed == 0] = -1
    observed = np.zeros_like(signed)
    rng = np.random.RandomState(seed)
    for i in range(signed.shape[0]):
        positives = np.nonzero(signed[i, :] == 1.0)[0]
        rng.shuffle(positives)
        observed[i, positives[:num_pos]] = 1.0
        negatives = np.nonzero(signed[i, :] == -1.0)[0]
        rng.shuffle(negatives)
        observed[i, negatives[:num_neg]] = -1.0
    return observed


def plain_proportion(full: np.ndarray, proportion: float, seed: int = 1200) -> np.ndarray:
    """The documented draw order, one uniform at a time: rows in order, classes in order within a row."""
    rng = np.random.RandomState(seed)
    observed = np.zeros(full.shape)
    for i in range(full.shape[0]):
        for c in range(full.shape[1]):
            if rng.random_sample() < proportion:
                observed[i, c] = 1.0 if full[i, c] > 0 else -1.0
    return observed


def random_full(n=60, c=9, seed=0) -> np.ndarray:
    full = (np.random.default_rng(seed).random((n, c)) < 0.3).astype(np.float64)
    full[0] = 0  # a row without positives
    full[1] = 1  # a row without negatives
    return full


def npy_bytes(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------- regimes


@pytest.mark.parametrize("num_pos, num_neg", [(1, 0), (2, 0), (2, 1), (0, 3), (5, 5)])
def test_num_pos_num_neg_match_the_official_generator_element_for_element(num_pos, num_neg):
    full = random_full()
    got = label_rules.observe_labels(full, num_pos, num_neg)
    np.testing.assert_array_equal(got, official_observe(full, num_pos, num_neg))
    got_regime = Regime(num_pos, num_neg).observe(full)
    np.testing.assert_array_equal(got_regime, got)


@pytest.mark.parametrize("proportion", [0.1, 0.3, 1.0])
def test_label_proportion_matches_the_documented_draw_order(proportion):
    full = random_full()
    got = label_rules.observe_label_proportion(full, proportion)
    np.testing.assert_array_equal(got, plain_proportion(full, proportion))
    assert ((got == 1) <= (full == 1)).all() and ((got == -1) <= (full == 0)).all()
    if proportion == 1.0:
        np.testing.assert_array_equal(got, np.where(full > 0, 1, -1))
    np.testing.assert_array_equal(Regime(proportion=proportion).observe(full), got)


def test_regime_file_names_keep_the_official_name_for_the_paper_regime():
    assert Regime().file("train") == "formatted_train_labels_obs.npy"
    assert Regime(1, 0).tag == ""
    assert Regime(2, 1).file("train") == "formatted_train_labels_obs_p2n1.npy"
    assert Regime(0, 3).file("val") == "formatted_val_labels_obs_p0n3.npy"
    assert Regime(proportion=0.3).file("train") == "formatted_train_labels_obs_prop0.3.npy"
    assert Regime(proportion=0.05).tag == "prop0.05"


def test_regime_of_reads_the_config_and_refuses_impossible_combinations():
    assert label_rules.regime_of(SimpleNamespace()) == Regime()  # fields absent: the paper's regime
    assert label_rules.regime_of(SimpleNamespace(num_pos=2, num_neg=1, label_proportion=None)) == Regime(2, 1)
    assert label_rules.regime_of(SimpleNamespace(num_pos=1, num_neg=0, label_proportion=0.5)) == Regime(proportion=0.5)
    with pytest.raises(DataError, match="--label_proportion .* cannot be combined with --num_pos or --num_neg"):
        label_rules.regime_of(SimpleNamespace(num_pos=2, num_neg=0, label_proportion=0.5))
    with pytest.raises(DataError, match=r"--label_proportion must lie in \(0, 1\]"):
        label_rules.regime_of(SimpleNamespace(label_proportion=0.0))
    with pytest.raises(DataError, match="--num_pos 0 --num_neg 0 observes no label"):
        label_rules.regime_of(SimpleNamespace(num_pos=0, num_neg=0))


def test_a_proportion_that_observes_no_label_at_all_is_refused(tmp_path):
    root = make_nuswide(tmp_path / "nuswide")
    with pytest.raises(DataError, match=r"observes no label at all among the 10 training images .* larger"):
        datasets.build_data(cfg_for("nuswide", root, label_proportion=1e-6))
    observed = root / "formatted_train_labels_obs.npy"  # the paper's regime from an all-zero (damaged) file
    np.save(observed, np.zeros_like(np.load(root / "formatted_train_labels.npy")))
    with pytest.raises(DataError, match=rf"single positive .* damaged: delete {observed} to regenerate it"):
        datasets.build_data(cfg_for("nuswide", root))


def test_regimes_are_cached_in_their_own_files_and_never_mix(tmp_path, capsys):
    root = make_nuswide(tmp_path / "nuswide")
    default = datasets.build_data(cfg_for("nuswide", root))
    official_file = root / "formatted_train_labels_obs.npy"
    official_bytes = official_file.read_bytes()
    np.testing.assert_array_equal(np.load(official_file), official_observe(nuswide_labels("train"), 1, 0))

    two = datasets.build_data(cfg_for("nuswide", root, num_pos=2, num_neg=1))
    assert "observed labels: 2 positive(s) and 1 negative(s) per image" in capsys.readouterr().out
    stored = np.load(root / "formatted_train_labels_obs_p2n1.npy")
    np.testing.assert_array_equal(stored, official_observe(nuswide_labels("train"), 2, 1))
    prop = datasets.build_data(cfg_for("nuswide", root, label_proportion=0.3))
    stored_prop = np.load(root / "formatted_train_labels_obs_prop0.3.npy")
    np.testing.assert_array_equal(stored_prop, plain_proportion(nuswide_labels("train"), 0.3))
    assert official_file.read_bytes() == official_bytes  # the other regimes never touched the official file

    # train rows [0 1 2 4 5 6 8 9] of the official train split (RandomState(1200) split, see test_formats.py)
    rows = [0, 1, 2, 4, 5, 6, 8, 9]
    np.testing.assert_array_equal(default.train.observed, official_observe(nuswide_labels("train"), 1, 0)[rows])
    np.testing.assert_array_equal(two.train.observed, stored[rows])
    np.testing.assert_array_equal(prop.train.observed, stored_prop[rows])
    assert default.train.observed.dtype == two.train.observed.dtype == np.int8


def test_a_regime_on_partial_labels_is_refused(tmp_path):
    root = make_openimages(tmp_path / "oi")
    with pytest.raises(DataError, match="OpenImages has only partial labels"):
        datasets.build_data(cfg_for("openimages", root, num_pos=2))


# ------------------------------------------------------------------------------------------ where derived files go


def test_derived_dir_is_the_data_root_when_writable_else_a_cache_folder(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    root.mkdir()
    assert datasets.derived_dir(cfg_for("coco", root)) == root
    key = "coco-" + __import__("hashlib").sha1(os.path.realpath(root).encode()).hexdigest()[:12]
    assert datasets.derived_dir(cfg_for("coco", root, cache_dir=str(tmp_path / "c"))) == tmp_path / "c" / key
    assert datasets.derived_dir(cfg_for("pascal", root, cache_dir=str(tmp_path / "c"))).name.startswith("pascal-")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets, "_noted_read_only", set())
    real_access = os.access
    monkeypatch.setattr(datasets.os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    capsys.readouterr()
    assert datasets.derived_dir(cfg_for("coco", root)) == tmp_path / "xdg" / "largeloss" / key
    assert datasets.derived_dir(cfg_for("coco", root)) == tmp_path / "xdg" / "largeloss" / key
    out = capsys.readouterr().out
    assert out.count(f"note: the data root {root} is not writable") == 1  # said once


def test_a_read_only_data_root_is_used_and_never_written(tmp_path, monkeypatch):
    """Raw annotations only, in a data root the tool may not write: formatted files and observed labels go to the
    user cache, and a second build reads them from there."""
    root = make_pascal(tmp_path / "pascal")
    before = sorted(str(p) for p in root.rglob("*"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_access = os.access
    monkeypatch.setattr(datasets.os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    cfg = cfg_for("pascal", root)
    data = datasets.build_data(cfg)
    derived = datasets.derived_dir(cfg)
    assert derived.parent == tmp_path / "xdg" / "largeloss"
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert (derived / "formatted_train_labels.npy").exists() and (derived / "formatted_train_labels_obs.npy").exists()
    stamp = (derived / "formatted_train_labels_obs.npy").stat().st_mtime_ns
    again = datasets.build_data(cfg)
    assert (derived / "formatted_train_labels_obs.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.train.observed, data.train.observed)


def test_a_chmod_read_only_data_root_works(tmp_path, monkeypatch):
    root = make_nuswide(tmp_path / "nuswide")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        data = datasets.build_data(cfg_for("nuswide", root))
        assert not (root / "formatted_train_labels_obs.npy").exists()
        derived = datasets.derived_dir(cfg_for("nuswide", root))
        assert (derived / "formatted_train_labels_obs.npy").exists() and len(data.train) == 8
    finally:
        os.chmod(root, 0o755)


def test_cache_dir_takes_every_derived_file_and_the_official_file_in_the_root_still_wins(tmp_path):
    root = make_nuswide(tmp_path / "nuswide")
    official = np.zeros((10, 81))
    for row in range(10):
        official[row, np.flatnonzero(nuswide_labels("train")[row])[-1:]] = 1  # the other positive than ours, if any
    np.save(root / "formatted_train_labels_obs.npy", official)
    cfg = cfg_for("nuswide", root, cache_dir=str(tmp_path / "cache"))
    data = datasets.build_data(cfg)
    np.testing.assert_array_equal(data.train.observed, official[[0, 1, 2, 4, 5, 6, 8, 9]])
    derived = datasets.derived_dir(cfg)
    assert not (derived / "formatted_train_labels_obs.npy").exists()  # the root's file is used, none made
    assert (derived / "formatted_val_labels_obs.npy").exists() and not (root / "formatted_val_labels_obs.npy").exists()


def test_disk_cache_path_under_the_derived_dir(tmp_path):
    split = datasets.Split("", np.array(["a.png"]), np.zeros((1, 2)), np.zeros((1, 2)))
    path = loaders.disk_cache_path(split, 8, tmp_path / "derived")
    assert path.parent == tmp_path / "derived" / "cache"


# ---------------------------------------------------------------------------------------------------------- locking


def hold_lock_in_thread(path: Path, seconds: float) -> threading.Thread:
    held = files.acquire_lock(path, "test")

    def release():
        time.sleep(seconds)
        held.release()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_observed_labels_wait_for_the_data_lock_then_are_refused_with_a_message(tmp_path, monkeypatch, capsys):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    lock = root / files.DATA_LOCK_NAME
    monkeypatch.setattr(files, "LOCK_WAIT_S", 0.3)
    held = files.acquire_lock(lock, "test")
    try:
        with pytest.raises(files.LockError, match=f"The data folder {root} .* is in use by another process"):
            datasets.load_formatted("nuswide", root)
        assert not (root / "formatted_train_labels_obs.npy").exists()
        assert "Waiting for it" in capsys.readouterr().out
    finally:
        held.release()
    monkeypatch.setattr(files, "LOCK_WAIT_S", 30)
    thread = hold_lock_in_thread(lock, 0.5)  # released while the loader waits: it then goes on
    data = datasets.load_formatted("nuswide", root)
    thread.join()
    np.testing.assert_array_equal(data["train"]["labels_obs"], official_observe(nuswide_labels("train"), 1, 0))


def test_disk_cache_build_waits_for_its_lock(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(image)
    split = datasets.Split("", np.array([str(image)]), np.zeros((1, 2)), np.zeros((1, 2)))
    path = loaders.disk_cache_path(split, 4, tmp_path)
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(files, "LOCK_WAIT_S", 0.2)
    held = files.acquire_lock(path.with_name(path.name + ".lock"), "test")
    with pytest.raises(files.LockError, match="The disk cache .* is in use by another process"):
        loaders.build_disk_cache(split, 4, path, 0)
    held.release()
    loaders.build_disk_cache(split, 4, path, 0)
    assert loaders.disk_cache_complete(path, 1, 4)


def test_a_disk_cache_cut_short_behind_an_intact_bitmap_is_rebuilt_not_read(tmp_path):
    images = []
    for value in (7, 9):
        images.append(tmp_path / f"{value}.png")
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(images[-1])
    split = datasets.Split("", np.array([str(i) for i in images]), np.zeros((2, 2)), np.zeros((2, 2)))
    path = loaders.disk_cache_path(split, 4, tmp_path)
    loaders.build_disk_cache(split, 4, path, 0)
    with open(path, "r+b") as f:
        f.truncate(50)  # the second image cut short; its .done.npy still marks every image done
    assert not loaders.disk_cache_complete(path, 2, 4)
    with pytest.raises(DataError, match=rf"The disk cache {path} holds 50 bytes, not the 2 x 4 x 4 x 3 = 96 .* Delete"):
        loaders.ImageDataset(split, 4, path)[1]  # read as it is (a process that did not build it)
    loaders.build_disk_cache(split, 4, path, 0)  # the path a missing cache takes: built anew
    assert path.stat().st_size == 96 and loaders.disk_cache_complete(path, 2, 4)
    cached = loaders.ImageDataset(split, 4, path)
    assert (cached[0][0] == 7).all() and (cached[1][0] == 9).all()


RACE = """
import os, sys, time
sys.path.insert(0, {repo!r})
import datasets
open({ready!r} + str(os.getpid()), "w").close()
while not os.path.exists({go!r}):  # both start together
    time.sleep(0.01)
data = datasets.load_formatted("nuswide", {root!r})
print(int(data["train"]["labels_obs"].sum()))
"""


@pytest.mark.slow
def test_two_first_runs_on_one_fresh_data_root_do_not_race(tmp_path):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    labels = np.zeros((20000, 81))
    labels[:, ::3] = 1  # big enough that making and writing the observed labels takes a while
    np.save(root / "formatted_train_labels.npy", labels)
    np.save(root / "formatted_train_images.npy", np.array([f"{i}.jpg" for i in range(20000)]))
    ready, go = tmp_path / "ready-", tmp_path / "go"
    script = RACE.format(repo=str(REPO), root=str(root), ready=str(ready), go=str(go))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out.strip().splitlines()[-1] for out, _ in results] == ["20000", "20000"]
    np.testing.assert_array_equal(np.load(root / "formatted_train_labels_obs.npy"), official_observe(labels, 1, 0))
    assert not list(root.glob("*.tmp"))


def test_synthetic_generation_takes_the_data_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "NUM_TRAIN", 4)
    monkeypatch.setattr(synthetic, "NUM_TEST", 2)
    monkeypatch.setattr(files, "LOCK_WAIT_S", 0.2)
    root = tmp_path / "syn"
    root.mkdir()
    held = files.acquire_lock(root / files.DATA_LOCK_NAME, "test")
    with pytest.raises(files.LockError, match="The synthetic data folder"):
        synthetic.ensure_dataset(root)
    held.release()
    synthetic.ensure_dataset(root)
    assert (root / "formatted_val_labels.npy").exists()


# ------------------------------------------------------------------------------------------ label dtypes and checks


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int8, np.int64, np.float32, np.float64])
def test_label_files_of_any_numeric_dtype_are_read_as_their_numbers(tmp_path, dtype):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    for phase in ("train", "val"):
        np.save(root / f"formatted_{phase}_labels.npy", nuswide_labels(phase).astype(dtype))
    data = datasets.load_formatted("nuswide", root)
    observed = data["train"]["labels_obs"]
    assert observed.dtype.kind in "fi"  # signed: -1 never wraps into True or 255
    expected = official_observe(nuswide_labels("train"), 1, 0)
    np.testing.assert_array_equal(observed.astype(np.float64), expected)
    assert (observed == 1).sum() == 8  # the 8 rows with a positive, one positive each
    np.testing.assert_array_equal(np.load(root / "formatted_train_labels_obs.npy").astype(np.float64), expected)
    negatives = label_rules.observe_labels(nuswide_labels("train").astype(dtype), 1, 2)
    np.testing.assert_array_equal(negatives.astype(np.float64), official_observe(nuswide_labels("train"), 1, 2))


def test_observe_labels_on_bool_input_gives_signed_labels():
    full = np.array([[True, False, False], [False, True, True]])
    observed = label_rules.observe_labels(full, 1, 1)
    assert observed.dtype == np.int8
    np.testing.assert_array_equal(observed, official_observe(full.astype(float), 1, 1))
    assert set(np.unique(observed)) == {-1, 0, 1}


def observed_fixture(tmp_path) -> Path:
    root = make_nuswide(tmp_path / "nuswide", images=False)
    datasets.load_formatted("nuswide", root)
    return root


def test_an_observed_file_with_shifted_rows_is_refused_with_the_fix(tmp_path):
    root = observed_fixture(tmp_path)
    path = root / "formatted_train_labels_obs.npy"
    np.save(path, np.roll(np.load(path), 1, axis=0))
    with pytest.raises(DataError) as err:
        datasets.load_formatted("nuswide", root)
    message = str(err.value)
    assert f"{path} does not match the full labels" in message
    # rows 0..9: positives at classes {r, 7r+40}; rows 3 and 5 have none. Shifted down by one, the 8 observed
    # positives land on other rows: none is a true positive there (row 3 and 5's has none, the others differ).
    assert "8 of its 8 observed entries are observed positives that are not true positives" in message
    assert f"delete {path} to regenerate it" in message


def test_an_observed_negative_that_is_a_true_positive_is_refused(tmp_path):
    root = observed_fixture(tmp_path)
    path = root / "formatted_train_labels_obs.npy"
    observed = np.load(path)
    observed[0, 40] = -1  # row 0's classes 0 and 40 are positive
    np.save(path, observed)
    with pytest.raises(DataError, match=r"observed negatives that are true positives \(the first at row 0, class 40\)"):
        datasets.load_formatted("nuswide", root)


def test_an_observed_file_of_another_shape_is_refused(tmp_path):
    root = observed_fixture(tmp_path)
    path = root / "formatted_train_labels_obs.npy"
    np.save(path, np.zeros((9, 81)))
    with pytest.raises(DataError, match=rf"{path} has shape \(9, 81\).*delete {path} to regenerate it"):
        datasets.load_formatted("nuswide", root)


# -------------------------------------------------------------------------------------------------------- images


def saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 25700], [65535, 32896]], dtype=np.uint16)  # /257: 0, 100, 255, 128
    path = saved(tmp_path, Image.fromarray(values), "g16.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    image = loaders.load_image(path, 2)
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    np.testing.assert_array_equal(image[..., 0], [[0, 100], [255, 128]])
    assert (image[..., 0] == image[..., 2]).all()
    # mode I (32-bit, as older Pillow opens 16-bit PNGs) is read on the same 16-bit scale
    path_i = saved(tmp_path, Image.fromarray(values.astype(np.int32)), "gI.tif")
    with Image.open(path_i) as raw:
        assert raw.mode == "I"
    np.testing.assert_array_equal(loaders.load_image(path_i, 2)[..., 1], [[0, 100], [255, 128]])


def test_other_image_modes_become_the_right_rgb(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert loaders.load_image(saved(tmp_path, palette, "p.png"), 2).tolist()[0] == [[0, 0, 0], [10, 20, 30]]
    la = Image.fromarray(np.array([[[60, 0], [200, 255]]], dtype=np.uint8), "LA")
    assert loaders.load_image(saved(tmp_path, la, "la.png"), 2).tolist()[0] == [[60, 60, 60], [200, 200, 200]]
    rgba = Image.fromarray(np.array([[[1, 2, 3, 0], [4, 5, 6, 255]]], dtype=np.uint8), "RGBA")
    assert loaders.load_image(saved(tmp_path, rgba, "rgba.png"), 2).tolist()[0] == [[1, 2, 3], [4, 5, 6]]
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0]]], dtype=np.uint8), "CMYK")
    assert loaders.load_image(saved(tmp_path, cmyk, "c.tif"), 2).tolist()[0] == [[255, 255, 255], [0, 255, 255]]
    bits = Image.fromarray(np.array([[False, True]]))
    assert loaders.load_image(saved(tmp_path, bits, "b.png"), 2).tolist()[0] == [[0, 0, 0], [255, 255, 255]]


def test_an_image_too_large_to_decode_safely_is_an_undecodable_image(tmp_path, monkeypatch):
    path = saved(tmp_path, Image.new("1", (20, 16)), "big.png")  # 320 pixels, over twice the limit set below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as a 15000 x 15000 image against PIL's own limit
    for decode in (lambda p: loaders.load_image(p, 8), loaders.decode_image):
        with pytest.raises(DataError, match=rf"Cannot decode image {path}: it is too large to decode safely \("):
            decode(path)
    order = next(iter(resize.PASS_ORDERS))
    assert loaders.check_device_resize([path], 8, torch.device("cpu"), order) == 0  # skipped, as unreadable files


# ------------------------------------------------------------------------------------------- damaged formatted files

DAMAGED = {
    "zero bytes": (b"", "is empty (zero bytes or cut short)"),
    "truncated": (npy_bytes(np.zeros((10, 81)))[:200], "is not a readable numpy array: it is cut short or damaged"),
    "object array": (npy_bytes(np.array([{"a": 1}], dtype=object), True), "it holds Python objects (a pickle)"),
    "pickle": (pickle.dumps([1, 2, 3]), "it holds Python objects (a pickle)"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
@pytest.mark.parametrize("name", ["formatted_train_labels.npy", "formatted_val_images.npy"])
def test_a_damaged_formatted_file_is_a_data_error_naming_it(tmp_path, case, name):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    content, what = DAMAGED[case]
    (root / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        datasets.load_formatted("nuswide", root)
    message = str(err.value)
    assert message.startswith(f"{root / name} ") and what in message
    assert "Replace" in message and "data/nuswide/README.md" in message  # NUS-WIDE: no raw form to make it from


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_observed_file_says_to_delete_it(tmp_path, case):
    root = observed_fixture(tmp_path)
    path = root / "formatted_train_labels_obs.npy"
    content, what = DAMAGED[case]
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"Delete {path} to regenerate it"):
        datasets.load_formatted("nuswide", root)


def test_an_images_file_that_is_not_a_list_of_names_is_refused(tmp_path):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    np.save(root / "formatted_val_images.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"formatted_val_images\.npy holds no 1-D list of names"):
        datasets.load_formatted("nuswide", root)
    np.save(root / "formatted_val_images.npy", np.array([], dtype="U5"))
    with pytest.raises(DataError, match=r"formatted_val_images\.npy holds no image names"):
        datasets.load_formatted("nuswide", root)


def test_an_image_listed_twice_in_a_formatted_file_is_refused(tmp_path):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    names = list(NUSWIDE_TRAIN_NAMES)
    names[7] = names[2]
    np.save(root / "formatted_train_images.npy", np.array(names))
    with pytest.raises(DataError) as err:
        datasets.load_formatted("nuswide", root)
    message = str(err.value)
    assert message.startswith(f"{root / 'formatted_train_images.npy'} lists the image {names[2]!r} 2 times (rows 2 "
                              "and 7): each image must be listed once")  # fmt: skip
    assert message.endswith(f"Replace {root / 'formatted_train_images.npy'} and {root / 'formatted_train_labels.npy'} "
                            "with the files data/nuswide/README.md describes.")  # fmt: skip
    assert not (root / "formatted_train_labels_obs.npy").exists()  # refused before any observed label is drawn


def test_an_image_in_both_the_train_and_the_test_file_is_refused(tmp_path):
    root = make_nuswide(tmp_path / "nuswide", images=False)
    val = np.load(root / "formatted_val_images.npy")
    val[1] = NUSWIDE_TRAIN_NAMES[4]
    np.save(root / "formatted_val_images.npy", val)
    with pytest.raises(DataError) as err:
        datasets.load_formatted("nuswide", root)
    assert str(err.value).startswith(
        f"{root / 'formatted_val_images.npy'} lists the image {NUSWIDE_TRAIN_NAMES[4]!r} (row 1), which "
        f"{root / 'formatted_train_images.npy'} lists too (row 4): the train and val splits must not share an image"
    )


def test_repeated_name_is_exact_for_sorted_shuffled_and_mixed_names():
    rng = np.random.default_rng(0)
    names = np.char.add(np.char.add(b"images_train/", formats._hex_ids(np.unique(rng.integers(0, 2**63, 5000).astype(
        np.uint64)))), b".jpg")  # fmt: skip
    val = np.char.add(b"images_val/", formats._hex_ids(np.arange(1, 40, dtype=np.uint64)))
    assert datasets.repeated_name({"train": names, "val": val}) is None  # sorted, disjoint: one pass
    shuffled = names[rng.permutation(len(names))]
    assert datasets.repeated_name({"train": shuffled, "val": val[::-1]}) is None  # unsorted: through np.unique
    shuffled[3000] = shuffled[10]
    assert datasets.repeated_name({"train": shuffled}) == (shuffled[10].decode(), [("train", 10), ("train", 3000)])
    assert datasets.repeated_name({"a": np.array(["x", "y", "x", "x"]), "b": np.array([b"z"])}) == (
        "x", [("a", 0), ("a", 2), ("a", 3)]
    )  # fmt: skip
    assert datasets.repeated_name({"a": np.array(["x", "y"]), "b": np.array([b"y"])}) == ("y", [("a", 1), ("b", 0)])


def test_wrong_user_formatted_files_name_exactly_what_to_delete(tmp_path):
    root = make_coco(tmp_path / "coco")
    datasets.format_dataset("coco", root)
    np.save(root / "formatted_val_labels.npy", np.zeros((3, 79)))  # one class short
    with pytest.raises(DataError) as err:
        datasets.load_formatted("coco", root)
    assert str(err.value).endswith(
        f"Delete {root / 'formatted_val_images.npy'} and {root / 'formatted_val_labels.npy'} and run again: the next "
        f"run formats them anew from the raw annotations in {root}."
    )
    (root / "formatted_val_images.npy").unlink()
    (root / "formatted_val_labels.npy").unlink()
    assert datasets.load_formatted("coco", root)["val"]["labels"].shape == (3, 80)  # the fix works


# ------------------------------------------------------------------------------------------------------ raw files

FORMATTED = ["formatted_train_images.npy", "formatted_train_labels.npy", "formatted_val_images.npy"]


def test_a_half_downloaded_coco_json_is_named_and_nothing_is_written(tmp_path):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations/instances_val2014.json"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        datasets.format_dataset("coco", root)
    assert str(err.value).startswith(f"{path} is not valid JSON (")
    assert "Download the COCO 2014 annotations again" in str(err.value)
    assert not any((root / name).exists() for name in FORMATTED)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d.pop("annotations"), "it has no 'annotations' and 'categories' lists"),
        (lambda d: d.update(categories=d["categories"][:79]), "it lists 79 categories, not the 80 distinct ones"),
        (lambda d: d["annotations"][0].update(category_id=12), "an annotation has category_id 12, which its"),
        (lambda d: d["annotations"][0].update(category_id=True), "an annotation has category_id True, which its"),
        (lambda d: d["annotations"][0].update(image_id=True), "an annotation has no integer image_id"),
    ],
)
def test_a_json_that_is_not_coco_2014_writes_nothing(tmp_path, change, problem):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations/instances_train2014.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        datasets.format_dataset("coco", root)
    assert str(err.value).startswith(f"{path} is not a COCO 2014 instances file: {problem}")
    assert "Nothing was written" in str(err.value)
    assert not list(root.glob("formatted_*"))
    path.write_text(json.dumps(json.loads((root / "annotations/instances_val2014.json").read_text())))
    datasets.format_dataset("coco", root)  # with a good file the next run formats: nothing stale in the way
    assert all((root / name).exists() for name in FORMATTED)


@pytest.mark.parametrize("key", ["annotations", "images", "categories"])
@pytest.mark.parametrize("value", [None, 5, "x"])
def test_a_coco_json_whose_lists_are_not_lists_names_the_key_and_writes_nothing(tmp_path, key, value):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations/instances_val2014.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        datasets.format_dataset("coco", root)
    message = str(err.value)
    assert message.startswith(
        f"{path} is not a COCO 2014 instances file: its '{key}' is {json.dumps(value)}, not a list"
    )
    assert "Nothing was written" in message and "Download the COCO 2014 annotations again" in message
    assert not list(root.glob("formatted_*"))


def test_a_formatter_output_of_the_wrong_class_count_writes_nothing(tmp_path, monkeypatch):
    root = make_pascal(tmp_path / "pascal")
    info = datasets.DATASET_INFO["pascal"]
    wrong = {"train": (np.array(["a.jpg"]), np.zeros((1, 19))), "val": (np.array(["b.jpg"]), np.zeros((1, 19)))}
    monkeypatch.setitem(datasets.DATASET_INFO, "pascal", datasets.dataclasses.replace(info, formatter=lambda r: wrong))
    with pytest.raises(DataError, match="give 19 classes, but VOC12 has 20: they are not the official VOC12 files. "):
        datasets.format_dataset("pascal", root)
    assert not list(root.glob("formatted_*"))


def test_an_openimages_csv_cut_mid_line_names_the_line(tmp_path):
    root = make_openimages(tmp_path / "oi")
    path = root / "2017_11/validation/annotations-human.csv"
    text = path.read_text()
    path.write_text(text[: text.index("/m/0c,0") + 4])  # the last line cut inside its LabelName
    with pytest.raises(DataError) as err:
        datasets.format_dataset("openimages", root)
    message = str(err.value)
    assert message.startswith(f"{path}, line 6: b'00000000000000b1,verification,/m/0' is not a complete ")
    assert "Download it again" in message
    assert not list(root.glob("formatted_*"))


@pytest.mark.parametrize("image_id", ["1ffffffffffffffff", "-1"])
def test_an_openimages_image_id_beyond_64_bits_or_negative_names_the_line(tmp_path, image_id):
    root = make_openimages(tmp_path / "oi", extra={"train": [f"{image_id},verification,/m/0a,1"]})
    path = root / "2017_11/train/annotations-human.csv"
    with pytest.raises(DataError) as err:
        datasets.format_dataset("openimages", root)
    assert str(err.value).startswith(f"{path}, line 15: ImageID b'{image_id}' is not a 16-digit hex id")
    assert "Download it again (data/openimages/README.md)" in str(err.value)
    assert not list(root.glob("formatted_*"))


def test_a_class_listed_twice_in_classes_trainable_names_both_lines(tmp_path):
    root = make_openimages(tmp_path / "oi")
    path = root / "2017_11/classes-trainable.txt"
    path.write_text(path.read_text().replace("/m/0f\n", "/m/0c\n"))  # still 5,000 lines; /m/0c on lines 3 and 6
    with pytest.raises(DataError, match=rf"{path} lists the class /m/0c twice \(lines 3 and 6\)"):
        datasets.format_dataset("openimages", root)
    assert not list(root.glob("formatted_*"))


def test_a_cub_image_id_listed_twice_names_both_lines(tmp_path):
    root = make_cub(tmp_path / "cub")
    path = root / "CUB_200_2011/images.txt"
    path.write_text(path.read_text() + "3 001.Black_footed_Albatross/Black_Footed_Albatross_0099_1.jpg\n")
    with pytest.raises(DataError) as err:
        datasets.format_dataset("cub", root)
    assert str(err.value).startswith(f"{path} lists the image id 3 twice (lines 1 and 8)")
    assert "data/cub/README.md" in str(err.value) and "image_attribute_labels" not in str(err.value)


def test_a_cub_image_path_keeps_its_two_spaces_in_a_row(tmp_path):
    root = make_cub(tmp_path / "cub")
    path = root / "CUB_200_2011/images.txt"
    old = "001.Black_footed_Albatross/Black_Footed_Albatross_0003_796136.jpg"
    new = "001.Black_footed_Albatross/Black  Footed Albatross_0003_796136.jpg"
    path.write_text(path.read_text().replace(old, new + " \t"))  # and blanks after it (an edited file), not part of it
    (root / "CUB_200_2011/images" / old).rename(root / "CUB_200_2011/images" / new)
    assert new in datasets.load_formatted("cub", root)["train"]["images"].tolist()
    datasets.build_data(cfg_for("cub", root))  # every listed image found


def test_raw_annotations_listing_one_image_twice_write_nothing(tmp_path):
    root = make_cub(tmp_path / "cub")
    path = root / "CUB_200_2011/images.txt"
    lines = path.read_text().splitlines()
    lines[2] = "2 " + lines[1].split(maxsplit=1)[1]  # image 2 given image 1's path (1 is train, 2 test)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        datasets.format_dataset("cub", root)
    assert str(err.value).startswith(f"The raw annotations in {root} list the image "
                                     f"{lines[1].split()[1]!r} in both the train and the val split")  # fmt: skip
    assert not list(root.glob("formatted_*"))


def test_a_cub_label_line_cut_short_names_the_line(tmp_path):
    root = make_cub(tmp_path / "cub")
    path = root / "CUB_200_2011/attributes/image_attribute_labels.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1] + ["7 31"]))  # the last line (image 7, attribute 312) cut short
    with pytest.raises(DataError, match=rf"{path}, line {7 * 312}: '7 31' cannot be read"):
        datasets.format_dataset("cub", root)


@pytest.mark.parametrize("flag", ["x", "2"])  # 1, -1 and 0 (difficult) only: a 2 was silently not positive
def test_a_pascal_flag_that_is_not_a_number_names_the_line(tmp_path, flag):
    root = make_pascal(tmp_path / "pascal")
    path = root / "VOCdevkit/VOC2012/ImageSets/Main/dog_val.txt"
    path.write_text(path.read_text().replace("2008_000009 -1", f"2008_000009 {flag}"))
    with pytest.raises(DataError, match=rf"{path}, line 1: '2008_000009 {flag}' cannot be read"):
        datasets.format_dataset("pascal", root)


@pytest.mark.parametrize("confidence", ["nan", "2"])  # a probability: nan was read as absent
def test_an_openimages_confidence_that_is_no_probability_names_the_line(tmp_path, confidence):
    root = make_openimages(tmp_path / "oi", extra={"train": [f"00000000000000ff,verification,/m/0a,{confidence}"]})
    path = root / "2017_11/train/annotations-human.csv"
    with pytest.raises(DataError, match=rf"{path}, line 15: Confidence '{confidence}' is not a probability in"):
        datasets.format_dataset("openimages", root)
    assert not list(root.glob("formatted_*"))


def test_a_pascal_class_file_that_is_not_text_names_the_byte(tmp_path):
    root = make_pascal(tmp_path / "pascal")
    path = root / "VOCdevkit/VOC2012/ImageSets/Main/cat_train.txt"
    path.write_bytes(path.read_bytes()[:12] + b"\x00\xff")
    with pytest.raises(DataError, match=rf"{path} is not a text file \(its byte 13 cannot be decoded"):
        datasets.format_dataset("pascal", root)


# ------------------------------------------------------------------------------------------------- empty splits


def test_val_frac_leaving_an_empty_split_names_the_flag(tmp_path):
    root = make_nuswide(tmp_path / "nuswide")  # 10 train images
    with pytest.raises(DataError, match=r"--val_frac 0.999 leaves an empty training split .* between 0.1 and 0.9"):
        datasets.build_data(cfg_for("nuswide", root, val_frac=0.999))
    with pytest.raises(DataError, match=r"--val_frac 0.01 leaves an empty validation split"):
        datasets.build_data(cfg_for("nuswide", root, val_frac=0.01))


@pytest.mark.parametrize("flag", ["ss_frac_val", "ss_frac_train"])
def test_subsampling_to_nothing_names_the_flag(tmp_path, flag):
    root = make_nuswide(tmp_path / "nuswide")  # train 8, val 2
    with pytest.raises(DataError, match=rf"--{flag} 0.01 keeps no image: round\(0.01 x \d images\) = 0"):
        datasets.build_data(cfg_for("nuswide", root, **{flag: 0.01}))


@pytest.mark.slow
def test_val_frac_from_the_command_line_exits_1_without_a_traceback(tmp_path, capsys):
    root = make_nuswide(tmp_path / "nuswide")
    argv = ["--dataset", "nuswide", "--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--exp_name",
            "v", "--val_frac", "0.999", "--num_workers", "0", "--device", "cpu", "--arch", "resnet18",
            "--use_pretrained", "false"]  # fmt: skip
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --val_frac 0.999 leaves an empty training split") and "Traceback" not in err
    assert not (tmp_path / "runs/v").exists()


# ---------------------------------------------------------------------------------------- python datasets.py NAME


def test_prepare_refuses_zero_byte_images(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")
    for image in root.glob("*2014/*.jpg"):
        image.write_bytes(b"")
    assert prepare_data.cli(["coco", "--data_root", str(root)]) == 1
    err = capsys.readouterr().err
    # train 5 + val 3 annotated images, every one empty
    assert err.startswith("error: 8 of 8 are empty files (zero bytes), for example:")
    assert "ready" not in capsys.readouterr().out


def test_prepare_refuses_images_that_do_not_decode(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")
    bad = root / "val2014/COCO_val2014_000000000042.jpg"
    bad.write_bytes(b"not a jpeg at all")
    assert prepare_data.cli(["coco", "--data_root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 8 sampled images cannot be decoded:") and f"Cannot decode image {bad}" in err
    bad.unlink()
    (root / "val2014" / bad.name).write_bytes((root / "train2014/COCO_train2014_000000000009.jpg").read_bytes())
    assert prepare_data.cli(["coco", "--data_root", str(root)]) == 0
    assert f"coco is ready in {root}: train 5, val 3 images, 80 classes." in capsys.readouterr().out


@pytest.mark.slow
def test_python_datasets_py_coco_on_zero_byte_images_exits_1_without_a_traceback(tmp_path):
    root = make_coco(tmp_path / "coco")
    for image in root.glob("train2014/*.jpg"):
        image.write_bytes(b"")
    proc = subprocess.run([sys.executable, str(REPO / "datasets.py"), "coco", "--data_root", str(root)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "6 of 8 are empty files (zero bytes)" not in proc.stderr  # 5 annotated train images, not the 6 files
    assert "5 of 8 are empty files (zero bytes)" in proc.stderr and "Traceback" not in proc.stderr
    assert "is ready" not in proc.stdout


def test_a_missing_image_and_an_empty_one_are_both_counted(tmp_path):
    root = make_pascal(tmp_path / "pascal")
    (root / "VOCdevkit/VOC2012/JPEGImages/2009_000001.jpg").unlink()
    (root / "VOCdevkit/VOC2012/JPEGImages/2008_000009.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        datasets.build_data(cfg_for("pascal", root))
    assert str(err.value).startswith("1 of 8 listed images are missing and 1 of 8 are empty files (zero bytes)")


# ----------------------------------------------------------------------------------- classes without any positive


def test_one_note_names_the_classes_without_a_positive_in_val_and_test(tmp_path, capsys):
    root = make_pascal(tmp_path / "pascal")
    datasets.build_data(cfg_for("pascal", root))
    out = capsys.readouterr().out
    # val = train row 3 (2009_000001: bird) -> 19 classes without a positive; test = the official val: bicycle, car,
    # sheep, sofa -> 16 without. Up to 5 names each, in column order.
    assert (
        "note: classes without any positive image: val 19 of 20 (aeroplane, bicycle, boat, bottle, bus, ...); "
        "test 16 of 20 (aeroplane, bird, boat, bottle, bus, ...). Each enters that split's mAP with AP 0: the official "
        "evaluation keeps every class in the mean, and so does this one." in out
    )
    assert out.count("note: classes without any positive image") == 1


def test_classes_without_positives_dense_and_sparse():
    dense = np.array([[1, 0, 0], [1, 0, 1]], dtype=np.float32)
    assert datasets.classes_without_positives(dense).tolist() == [1]
    sparse = label_rules.SparseLabels.from_entries(
        np.array([0, 1, 1]), np.array([0, 0, 2]), np.array([1, -1, -1], dtype=np.int8), 2, 4
    )  # class 0 has a positive, class 2 only a negative (AP 0), classes 1 and 3 no entry (left out of the mAP)
    assert datasets.classes_without_positives(sparse).tolist() == [2]


# ---------------------------------------------------------------------------------------------------- import graph


def module_imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth, except inside ``if __name__ == "__main__":``."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def test_datasets_and_synthetic_do_not_import_each_other_both_ways():
    datasets_imports = module_imports(REPO / "datasets.py")
    assert "synthetic" not in datasets_imports and "checkpoint" not in datasets_imports and "files" in datasets_imports
    assert "datasets" in module_imports(REPO / "synthetic.py")  # one direction: synthetic uses datasets
    assert "checkpoint" not in module_imports(REPO / "synthetic.py")


def test_the_synthetic_entry_is_complete_once_synthetic_is_imported(tmp_path):
    info = datasets.DATASET_INFO["synthetic"]
    assert info.prepare is synthetic.ensure_dataset
    assert datasets.class_names("synthetic", tmp_path) == [f"class {i}" for i in range(16)]  # no data yet
    (tmp_path / "synthetic.json").write_text(json.dumps(synthetic._manifest()))
    assert datasets.class_names("synthetic", tmp_path) == list(synthetic.CLASS_NAMES)


def test_the_dataset_entries_carry_the_published_dataset_presets():
    # Written out from the LL paper's settings (VOC: SGD 5e-3; COCO, NUS-WIDE: Adam 1e-5; CUB: Adam 7.5e-5; all
    # ResNet-50 at 448 for 10 epochs); OpenImages has none published (COCO's); synthetic: the demo's.
    expected = {
        "pascal": ("VOC12", "sgd", 5e-3, "resnet50", 448), "coco": ("COCO14", "adam", 1e-5, "resnet50", 448),
        "nuswide": ("NUS-WIDE", "adam", 1e-5, "resnet50", 448), "cub": ("CUB", "adam", 7.5e-5, "resnet50", 448),
        "openimages": ("OpenImages", "adam", 1e-5, "resnet50", 448),
        "synthetic": ("synthetic", "adam", 1e-3, "smallcnn", 32),
    }  # fmt: skip
    for name, (title, optimizer, lr, arch, size) in expected.items():
        info = datasets.DATASET_INFO[name]
        assert (info.title, info.defaults["optimizer"], info.defaults["lr"]) == (title, optimizer, lr)
        assert (info.defaults["arch"], info.defaults["image_size"], info.defaults["num_epochs"]) == (arch, size, 10)
    assert set(expected) == set(BUILT_IN_DATASETS)
    built_in = {n: datasets.DATASET_INFO[n] for n in expected}  # a researcher's own datasets left aside
    assert [n for n, i in built_in.items() if i.sparse] == ["openimages"]
    assert sorted(n for n, i in built_in.items() if i.formatter) == ["coco", "cub", "openimages", "pascal"]


def test_coco_fixture_image_ids_are_the_ones_the_counts_above_assume():
    assert len(COCO["train"][0]) == 6 and len(COCO["val"][0]) == 4  # 5 and 3 annotated


def test_a_cub_attribute_given_two_values_names_the_line(tmp_path):
    root = make_cub(tmp_path / "cub")
    path = root / "CUB_200_2011/attributes/image_attribute_labels.txt"
    image, attribute, value = map(int, path.read_text().split()[:3])  # the first line
    clean = formats.format_cub(root)
    path.write_text(path.read_text() + f"{image} {attribute} {value} 3 5.0\n")  # the same value again
    for split, (names, labels) in formats.format_cub(root).items():  # changes nothing
        assert names.tolist() == clean[split][0].tolist() and np.array_equal(labels, clean[split][1])
    path.write_text(path.read_text() + f"{image} {attribute} {1 - value} 3 5.0\n")
    lines = len(path.read_text().splitlines())
    with pytest.raises(DataError, match=rf"line {lines} gives image {image}, attribute {attribute} the value "
                       rf"{1 - value}, and an earlier line gave it {value}\."):  # fmt: skip
        formats.format_cub(root)
