"""Raw official annotations -> formatted files, on tiny fixture trees in each dataset's real on-disk layout
(tests/fixtures_raw.py), against values worked out by hand from the official formatting rules; the
OpenImages masked mAP and class groups on a hand case; the command line end to end on every fixture tree; and the
messages a user gets for missing or broken data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli, run_main
from fixtures_raw import (
    COCO_IDS_80,
    VOC_CLASSES,
    make_coco,
    make_cub,
    make_nuswide,
    make_openimages,
    make_pascal,
    nuswide_labels,
    write_jpeg,
)

import config
import datasets
import evaluation
import formats
import loaders
import main
import metrics
from datasets import DataError, class_groups, format_dataset, load_formatted
from label_rules import SparseLabels


def load(root, name):
    return np.load(root / name, allow_pickle=False)


def positives(labels: np.ndarray) -> list[list[int]]:
    """Per row, the columns holding 1."""
    return [np.flatnonzero(row == 1).tolist() for row in labels]


def check_formatted(root, expected: dict, dtype, num_classes: int) -> None:
    """The formatted files of each phase hold exactly the expected names and positive columns, in 0/1 of ``dtype``."""
    for phase, (names, pos) in expected.items():
        images = load(root, f"formatted_{phase}_images.npy")
        labels = load(root, f"formatted_{phase}_labels.npy")
        assert images.dtype.kind == "U" and images.tolist() == names
        assert labels.dtype == dtype and labels.shape == (len(names), num_classes)
        assert set(np.unique(labels)) <= {0, 1}
        assert positives(labels) == pos


# ------------------------------------------------------------------------------------------------------------ pascal
# VOC_CLASSES columns: aeroplane 0, bicycle 1, bird 2, bottle 4, car 6, chair 8, diningtable 10, dog 11, horse 12,
# person 14, sheep 16, sofa 17, tvmonitor 19.
# train (file order 2008_000015, 2008_000008, 2010_000002, 2008_000019, 2007_000032, 2009_000001): 2008_000019 has
# only a 0 (difficult) flag -> dropped; the other five sorted by file name.
PASCAL_TRAIN_NAMES = ["2007_000032.jpg", "2008_000008.jpg", "2008_000015.jpg", "2009_000001.jpg", "2010_000002.jpg"]
PASCAL_TRAIN_POS = [
    [19],  # 2007_000032: tvmonitor 1 (chair 0 = difficult is not positive)
    [12],  # 2008_000008: horse 1 (person 0 is not positive)
    [11, 14],  # 2008_000015: dog and person
    [2],  # 2009_000001: bird
    [0],  # 2010_000002: aeroplane
]
# val (file order 2008_000009, 2007_000005, 2008_000030, 2011_000001): 2008_000030 has only -1 -> dropped.
PASCAL_VAL_NAMES = ["2007_000005.jpg", "2008_000009.jpg", "2011_000001.jpg"]
PASCAL_VAL_POS = [[1, 6], [16], [17]]  # bicycle+car (diningtable 0 is not); sheep; sofa (bottle 0 is not)


def test_pascal_fixture_uses_the_real_line_format(tmp_path):
    make_pascal(tmp_path)
    lines = (tmp_path / "VOCdevkit/VOC2012/ImageSets/Main/person_train.txt").read_text().splitlines()
    assert lines[:2] == ["2008_000015  1", "2008_000008  0"] and lines[2] == "2010_000002 -1"
    assert VOC_CLASSES == formats.VOC_CLASSES  # the fixture's column names are the project's


def test_pascal_formatted_files(tmp_path):
    make_pascal(tmp_path)
    format_dataset("pascal", tmp_path)
    expected = {"train": (PASCAL_TRAIN_NAMES, PASCAL_TRAIN_POS), "val": (PASCAL_VAL_NAMES, PASCAL_VAL_POS)}
    check_formatted(tmp_path, expected, np.float64, 20)
    data = load_formatted("pascal", tmp_path)  # loads what was written, generating the observed labels
    assert data["train"]["images"].tolist() == PASCAL_TRAIN_NAMES
    assert data["val"]["labels"].shape == (3, 20)


def test_pascal_missing_class_file_names_it(tmp_path):
    make_pascal(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Main/bicycle_val.txt").unlink()
    with pytest.raises(DataError, match=r"bicycle_val\.txt.*data/README\.md"):
        format_dataset("pascal", tmp_path)


# -------------------------------------------------------------------------------------------------------------- coco
# train: annotated image ids {10, 9, 100, 3, 25} (7 has none) as strings sorted: "10" < "100" < "25" < "3" < "9".
COCO_TRAIN_NAMES = [
    f"train2014/COCO_train2014_{i}.jpg"
    for i in ("000000000010", "000000000100", "000000000025", "000000000003", "000000000009")
]
# val: annotated {5, 42, 1000} (8 has none): "1000" < "42" < "5".
COCO_VAL_NAMES = [f"val2014/COCO_val2014_{i}.jpg" for i in ("000000001000", "000000000042", "000000000005")]
# The default fixture lists the 80 ids starting [7, 1, 90, 3] -> columns 7:0, 1:1, 90:2, 3:3 (file order, not id order).
COCO_SMALL_TRAIN_POS = [
    [1, 2],  # 10: category 1 twice (one column) and 90
    [3],  # 100: category 3, a crowd annotation (still positive)
    [2],  # 25: 90
    [0, 1],  # 3: 7 and 1
    [0],  # 9: 7
]
COCO_SMALL_VAL_POS = [[1], [3], [0, 2]]  # 1000: 1; 42: 3; 5: 7 and 90 (crowd)
# The 80 real ids ascending: 1 -> column 0, 3 -> 2, 7 -> 6, 90 -> 79.
COCO_80_TRAIN_POS = [[0, 79], [2], [79], [0, 6], [6]]
COCO_80_VAL_POS = [[0], [2], [6, 79]]


def test_coco_formatted_files_with_unordered_gapped_categories(tmp_path):
    make_coco(tmp_path)
    format_dataset("coco", tmp_path)
    expected = {"train": (COCO_TRAIN_NAMES, COCO_SMALL_TRAIN_POS), "val": (COCO_VAL_NAMES, COCO_SMALL_VAL_POS)}
    check_formatted(tmp_path, expected, np.float64, 80)


def test_coco_formatted_files_with_the_80_real_category_ids(tmp_path):
    assert len(COCO_IDS_80) == 80 and COCO_IDS_80[-1] == 90
    make_coco(tmp_path, COCO_IDS_80)
    data = load_formatted("coco", tmp_path)
    assert data["train"]["images"].tolist() == COCO_TRAIN_NAMES and data["val"]["images"].tolist() == COCO_VAL_NAMES
    assert data["train"]["labels"].shape == (5, 80) and data["train"]["labels"].dtype == np.float64
    assert positives(data["train"]["labels"]) == COCO_80_TRAIN_POS
    assert positives(data["val"]["labels"]) == COCO_80_VAL_POS


def test_coco_val_with_other_categories_is_refused(tmp_path):
    make_coco(tmp_path)
    path = tmp_path / "annotations/instances_val2014.json"
    raw = json.loads(path.read_text())
    raw["categories"] = raw["categories"][::-1]  # same ids, another order: columns would mean other classes
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="other categories"):
        format_dataset("coco", tmp_path)


# --------------------------------------------------------------------------------------------------------------- cub
# images.txt order: ids 3, 1, 2, 7, 5, 4, 6; train_test_split: 2 and 5 are test (0), the rest train (1).
# train rows (images.txt order, is_train 1): 3, 1, 7, 4, 6; val rows: 2, 5. Columns: attribute id - 1.
CUB_TRAIN_NAMES = [
    "001.Black_footed_Albatross/Black_Footed_Albatross_0003_796136.jpg",
    "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg",
    "200.Common_Yellowthroat/Common_Yellowthroat_0007_190.jpg",
    "014.Indigo_Bunting/Indigo_Bunting_0004_11.jpg",
    "200.Common_Yellowthroat/Common_Yellowthroat_0006_10.jpg",
]
CUB_VAL_NAMES = [
    "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
    "014.Indigo_Bunting/Indigo_Bunting_0005_12.jpg",
]
CUB_TRAIN_POS = [
    [1, 2, 149],  # image 3: attributes 2, 3, 150
    [0, 311],  # image 1: attributes 1 and 312
    [0, 1],  # image 7: attributes 1, 2
    [],  # image 4: none (its line "4 7 0 2 0 8.25" has extra fields and is_present 0)
    [99],  # image 6: attribute 100, from the line "6 100 1 4 0 3.1 extra"
]
CUB_VAL_POS = [[4], [310, 311]]  # image 2: attribute 5 from "2 5 1 3 0 12.5"; image 5: attributes 311, 312


def test_cub_formatted_files(tmp_path):
    make_cub(tmp_path)
    labels_file = tmp_path / "CUB_200_2011/attributes/image_attribute_labels.txt"
    lines = labels_file.read_text().splitlines()
    assert len(lines) == 7 * 312 and "2 5 1 3 0 12.5" in lines  # 312 lines per image, one with extra fields
    format_dataset("cub", tmp_path)
    expected = {"train": (CUB_TRAIN_NAMES, CUB_TRAIN_POS), "val": (CUB_VAL_NAMES, CUB_VAL_POS)}
    check_formatted(tmp_path, expected, np.int64, 312)
    assert load_formatted("cub", tmp_path)["val"]["labels"].shape == (2, 312)


def test_cub_missing_attribute_line_is_reported(tmp_path):
    make_cub(tmp_path)
    labels_file = tmp_path / "CUB_200_2011/attributes/image_attribute_labels.txt"
    lines = labels_file.read_text().splitlines()
    labels_file.write_text("\n".join(line for line in lines if not line.startswith("6 17 ")) + "\n")
    with pytest.raises(DataError, match="image 6, attribute 17"):
        format_dataset("cub", tmp_path)


# ----------------------------------------------------------------------------------------------------------- nuswide


def test_nuswide_without_formatted_files_points_to_the_data_readme(tmp_path):
    with pytest.raises(DataError, match="data/README.md"):
        load_formatted("nuswide", tmp_path / "absent")
    make_nuswide(tmp_path, images=False)
    (tmp_path / "formatted_val_labels.npy").unlink()
    with pytest.raises(DataError, match=r"formatted_val_labels\.npy(.|\n)*data/README\.md"):
        load_formatted("nuswide", tmp_path)


def test_nuswide_formatted_files_load_unchanged_and_rows_without_positives_are_counted(tmp_path, capsys):
    root = make_nuswide(tmp_path / "nuswide")
    before = {p.name: p.read_bytes() for p in root.glob("formatted_*.npy")}
    data = load_formatted("nuswide", root)
    for phase in ("train", "val"):
        np.testing.assert_array_equal(data[phase]["labels"], nuswide_labels(phase))
        assert data[phase]["labels"].dtype == np.float64
    assert data["train"]["images"][0] == "actor/0000_2124494100.jpg" and len(data["val"]["images"]) == 3
    assert all((root / name).read_bytes() == raw for name, raw in before.items())  # nothing rewritten

    cfg = config.parse_config(["--dataset", "nuswide", "--data_root", str(root), "--num_workers", "0"])
    capsys.readouterr()
    built = datasets.build_data(cfg)
    out = capsys.readouterr().out
    # RandomState(1200).permutation(10) = [9 4 6 1 8 5 2 0 7 3], n_val = 2 -> train rows [0 1 2 4 5 6 8 9], val [3 7].
    # Rows without a positive: train 3 and 5 (-> val 1 of 2, train 1 of 8), official val row 1 (-> test 1 of 3).
    assert (
        "images without any positive label (kept, as the official tools keep them): train 1 of 8, val 1 of 2, "
        "test 1 of 3" in out
    )
    assert built.train.image_names.tolist() == [f"actor/{i:04d}_21244941{i:02d}.jpg" for i in (0, 1, 2, 4, 5, 6, 8, 9)]
    np.testing.assert_array_equal(built.val.labels, nuswide_labels("train")[[3, 7]])
    np.testing.assert_array_equal(built.test.labels, nuswide_labels("val"))
    assert built.num_classes == 81


# -------------------------------------------------------------------------------------------------------- openimages
# Columns /m/0a .. /m/0j = 0 .. 9; /m/zz is not trainable. Rows sorted by ImageID (16 lowercase hex digits).
# train rows: 000000000000000a, 000002b66c9c498e, 00000c3b5b7a8c8e, 0123456789abcdef, a1b2c3d4e5f60718,
#   ffff000000000000 (0000aa0000000001 has only /m/zz: no row)
OI_TRAIN_IDS = [
    "000000000000000a",
    "000002b66c9c498e",
    "00000c3b5b7a8c8e",
    "0123456789abcdef",
    "a1b2c3d4e5f60718",
    "ffff000000000000",
]
OI_TRAIN = (
    [0, 1, 3, 5, 7, 9, 10],
    [0, 0, 1, 2, 3, 0, 4, 1, 8, 9],
    [1, 1, -1, 1, 1, -1, 1, 1, 1, -1],
)  # 0a +; 0a +, 0b -; 0c +, 0d + (0 then 1 -> present); 0a -, 0e +; 0b +, 0i +; 0j - (no positive, still a row)
OI_VAL_IDS = ["00000000000000b1", "00000000000000c2", "0000000000000a01"]
OI_VAL = ([0, 2, 3, 5], [0, 2, 2, 1, 9], [1, -1, 1, 1, 1])  # 0a +, 0c -; 0c +; 0b +, 0j +
OI_TEST_IDS = ["0000000000000001", "1000000000000000"]  # abcdef0123456789 has only /m/zz: no row
OI_TEST = ([0, 3, 5], [0, 4, 5, 0, 1], [1, -1, 1, -1, 1])  # 0a +, 0e -, 0f +; 0a -, 0b +


def expected_openimages():
    return {
        "train": ("images_train", OI_TRAIN_IDS, OI_TRAIN),
        "val": ("images_val", OI_VAL_IDS, OI_VAL),
        "test": ("images_test", OI_TEST_IDS, OI_TEST),
    }


def test_openimages_formatted_files(tmp_path):
    make_openimages(tmp_path)
    format_dataset("openimages", tmp_path)
    for phase, (folder, ids, (indptr, indices, values)) in expected_openimages().items():
        images = load(tmp_path, f"formatted_{phase}_images.npy")
        assert images.dtype.kind == "S"
        assert images.tolist() == [f"{folder}/{i}.jpg".encode() for i in ids]
        assert load(tmp_path, f"formatted_{phase}_labels_indptr.npy").tolist() == indptr
        assert load(tmp_path, f"formatted_{phase}_labels_indices.npy").tolist() == indices
        stored_values = load(tmp_path, f"formatted_{phase}_labels_values.npy")
        assert stored_values.tolist() == values and stored_values.dtype == np.int8


def test_openimages_loads_the_formatted_files(tmp_path):
    make_openimages(tmp_path)
    data = load_formatted("openimages", tmp_path)
    train_labels = data["train"]["labels"]
    assert isinstance(train_labels, SparseLabels) and data["train"]["labels_obs"] is train_labels
    assert train_labels.indptr.tolist() == OI_TRAIN[0] and train_labels.values.tolist() == OI_TRAIN[2]
    assert train_labels.num_classes == 5000
    # Row 0 (000000000000000a) dense: +1 at /m/0a only.
    assert train_labels.dense(np.array([0]))[0, :10].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_openimages_classes_file_must_be_the_v3_one(tmp_path):
    make_openimages(tmp_path, num_classes=10)
    with pytest.raises(DataError, match="lists 10 classes"):
        format_dataset("openimages", tmp_path)


def test_openimages_bad_header_is_refused(tmp_path):
    make_openimages(tmp_path)
    csv = tmp_path / "2017_11/test/annotations-human.csv"
    csv.write_text("id,label\n" + "\n".join(csv.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(DataError, match="ImageID,Source,LabelName,Confidence"):
        format_dataset("openimages", tmp_path)


# ----------------------------------------------------------------------------------------- existing files are kept


def test_format_dataset_never_rewrites_an_existing_dense_file(tmp_path):
    make_pascal(tmp_path)
    np.save(tmp_path / "formatted_val_labels.npy", np.full((2, 20), 7.0))  # not what the raw files give
    kept = (tmp_path / "formatted_val_labels.npy").read_bytes()
    format_dataset("pascal", tmp_path)
    assert (tmp_path / "formatted_val_labels.npy").read_bytes() == kept
    assert load(tmp_path, "formatted_val_images.npy").tolist() == PASCAL_VAL_NAMES
    assert load(tmp_path, "formatted_train_images.npy").tolist() == PASCAL_TRAIN_NAMES
    assert positives(load(tmp_path, "formatted_train_labels.npy")) == PASCAL_TRAIN_POS


def test_format_dataset_with_every_file_present_reads_no_raw_file(tmp_path):
    for phase in ("train", "val"):
        np.save(tmp_path / f"formatted_{phase}_images.npy", np.array(["a.jpg"]))
        np.save(tmp_path / f"formatted_{phase}_labels.npy", np.zeros((1, 80)))
    format_dataset("coco", tmp_path)  # no annotations/ folder at all: must not be needed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "formatted_train_images.npy",
        "formatted_train_labels.npy",
        "formatted_val_images.npy",
        "formatted_val_labels.npy",
    ]


def test_format_dataset_never_rewrites_an_existing_openimages_images_file(tmp_path):
    make_openimages(tmp_path)
    np.save(tmp_path / "formatted_val_images.npy", np.array([b"x.jpg", b"y.jpg", b"z.jpg"]))
    kept = (tmp_path / "formatted_val_images.npy").read_bytes()
    format_dataset("openimages", tmp_path)
    assert (tmp_path / "formatted_val_images.npy").read_bytes() == kept
    assert load(tmp_path, "formatted_val_labels_indptr.npy").tolist() == OI_VAL[0]
    assert load(tmp_path, "formatted_test_images.npy").tolist() == [
        f"images_test/{i}.jpg".encode() for i in OI_TEST_IDS
    ]


def test_a_partial_set_of_sparse_label_parts_is_refused_and_kept(tmp_path):
    # One of a phase's three sparse parts exists: writing the other two would mix old and new, so formatting stops
    # with a message, and the existing file is not rewritten.
    make_openimages(tmp_path)
    np.save(tmp_path / "formatted_train_labels_values.npy", np.array([1, 1, 1], dtype=np.int8))
    kept = (tmp_path / "formatted_train_labels_values.npy").read_bytes()
    with pytest.raises(DataError, match=r"Delete \S*formatted_train_labels_values\.npy and run again"):
        format_dataset("openimages", tmp_path)
    assert (tmp_path / "formatted_train_labels_values.npy").read_bytes() == kept
    assert not (tmp_path / "formatted_train_labels_indptr.npy").exists()


# ---------------------------------------------------------------------------------- OpenImages masked mAP, groups
# 4 images x 5 classes. Annotated entries (row, class, value); every other entry is unknown.
MASK_ENTRIES = [
    (0, 0, 1),
    (1, 0, -1),
    (2, 0, 1),  # class 0; row 3 unknown with the highest score 0.95
    (1, 1, 1),
    (3, 1, -1),  # class 1; row 0 unknown with score 0.9
    # class 2: no annotated entry
    (0, 3, 1),
    (1, 3, -1),
    (2, 3, 1),  # class 3: 0.5 shared by a positive and a negative; row 3 unknown (0.99)
    (2, 4, -1),
    (3, 4, -1),  # class 4: annotated, but no positive
]
MASK_SCORES = [
    [0.90, 0.90, 0.5, 0.50, 0.3],
    [0.80, 0.20, 0.5, 0.50, 0.3],
    [0.70, 0.05, 0.5, 0.30, 0.4],
    [0.95, 0.60, 0.5, 0.99, 0.1],
]
# Per class, the annotated entries only, ranked by score; AP = mean over positives of precision at their threshold:
#   class 0: 0.9 (+), 0.8 (-), 0.7 (+) -> (1/1 + 2/3) / 2 = 5/6   (with the unknown 0.95 as a negative: 1/2)
#   class 1: 0.6 (-), 0.2 (+)          -> 1/2                      (with the unknown 0.9 as a negative: 1/3)
#   class 2: no entry                  -> NaN, left out of the mean
#   class 3: 0.5 (+ and -, one threshold: 1/2), 0.3 (+: 2/3) -> (1/2 + 2/3) / 2 = 7/12
#   class 4: negatives only            -> 0, counted
MASK_AP = [5 / 6, 1 / 2, math.nan, 7 / 12, 0.0]
MASK_MAP = 100 * (5 / 6 + 1 / 2 + 7 / 12 + 0) / 4  # = 100 * 23 / 48


def mask_labels() -> SparseLabels:
    rows, cols, values = (np.array(x) for x in zip(*MASK_ENTRIES, strict=True))
    return SparseLabels.from_entries(rows, cols, values.astype(np.int8), 4, 5)


def test_masked_ap_leaves_unknown_entries_out(tmp_path):
    scores = torch.tensor(MASK_SCORES, dtype=torch.float64)
    labels = mask_labels()
    rows, cols, values = labels.entries()
    got = metrics.average_precision_entries(scores[rows, cols], values > 0, cols, 5)
    np.testing.assert_allclose(got.numpy(), MASK_AP, equal_nan=True)
    np.testing.assert_allclose(evaluation.ap_against(scores, labels).numpy(), MASK_AP, equal_nan=True)
    dense = labels.dense(np.arange(4))
    ap = metrics.average_precision(np.array(MASK_SCORES), dense > 0, valid=dense != 0)
    np.testing.assert_allclose(ap, MASK_AP, equal_nan=True)
    assert metrics.mean_average_precision(np.array(MASK_SCORES), dense > 0, valid=dense != 0) == pytest.approx(MASK_MAP)


def test_evaluate_skips_classes_without_entries_and_reports_group_maps(monkeypatch):
    monkeypatch.setattr(evaluation, "predict", lambda *args, **kwargs: torch.tensor(MASK_SCORES, dtype=torch.float64))
    result = evaluation.evaluate(None, None, mask_labels(), torch.device("cpu"), class_groups=np.array([0, 0, 1, 1, 2]))
    assert result["map"] == pytest.approx(MASK_MAP)
    assert result["ap_per_class"][2] is None
    assert [a for i, a in enumerate(result["ap_per_class"]) if i != 2] == pytest.approx([500 / 6, 50, 700 / 12, 0])
    # G1 = classes 0, 1: (5/6 + 1/2) / 2; G2 = classes 2 (NaN, skipped), 3: 7/12; G3 = class 4: 0
    assert result["group_map"] == pytest.approx({"G1": 100 * 2 / 3, "G2": 100 * 7 / 12, "G3": 0.0})
    # a group whose classes were all left out has no mAP: null in final.json (strict JSON), not NaN
    result = evaluation.evaluate(None, None, mask_labels(), torch.device("cpu"), class_groups=np.array([0, 0, 1, 2, 2]))
    assert result["group_map"]["G2"] is None and json.loads(json.dumps(result["group_map"]))["G2"] is None


def test_class_groups_by_positive_count_rarest_first_ties_by_index():
    counts = np.array([5, 0, 3, 0, 7, 3, 1, 9, 2, 3])
    # Ascending, ties by class index: 1(0) 3(0) | 6(1) 8(2) | 2(3) 5(3) | 9(3) 0(5) | 4(7) 7(9): five groups of two.
    # The three classes with 3 positives split across groups by index: 2 and 5 in group 2, 9 in group 3.
    assert class_groups(counts).tolist() == [3, 0, 2, 0, 4, 2, 1, 4, 1, 3]
    # 7 classes: np.array_split sizes 2, 2, 1, 1, 1. Order 6(0) 3(1) 0(2) 4(2) 1(4) 5(5) 2(8).
    assert class_groups(np.array([2, 4, 8, 1, 2, 5, 0])).tolist() == [1, 2, 4, 0, 1, 3, 0]


# ------------------------------------------------------------------------------------------------- the command line
CLI = "--use_pretrained false --arch resnet18 --image_size 16 --num_epochs 1 --bsize 4 --device cpu".split()

# For the openimages run: 5000 MIDs (the real count), and test annotations so that every group G1..G5 has a scored
# class. Train positives are in classes 0 1 2 3 4 8; the other 4994 have 0 and come first, by index:
# G1 = 5 6 7 9 10..1005, G2 = 1006..2005, G3 = 2006..3005, G4 = 3006..4005, G5 = 4006..4999 and 0 1 2 3 4 8.
# Test classes: 0 1 4 (G5), 5 (G1, /m/0f), and the extra 1500 (G2), 2500 (G3), 3500 (G4).
OI_EXTRA = {
    "test": [
        "00000000000000ff,verification,/m/x1500,1",
        "00000000000000ff,verification,/m/x2500,0",
        "00000000000000ff,verification,/m/x3500,1",
    ]
}


def make_tree(dataset, root):
    if dataset == "coco":
        return make_coco(root, COCO_IDS_80)
    if dataset == "openimages":
        return make_openimages(root, 5000, OI_EXTRA)
    return {"pascal": make_pascal, "cub": make_cub, "nuswide": make_nuswide}[dataset](root)


# (number of classes, "images: ..." line): train/val = the 80/20 split of the official train rows (pascal 5 -> 4/1,
# coco 5 -> 4/1, cub 5 -> 4/1, nuswide 10 -> 8/2), test = the official val rows; openimages keeps its three splits.
END_TO_END = {
    "pascal": (20, "images: train 4, val 1, test 3"),
    "coco": (80, "images: train 4, val 1, test 3"),
    "cub": (312, "images: train 4, val 1, test 2"),
    "nuswide": (81, "images: train 8, val 2, test 3"),
    "openimages": (5000, "images: train 6, val 3, test 3"),
}


@pytest.mark.slow  # runs main.py or several processes
@pytest.mark.parametrize("dataset", list(END_TO_END))
def test_cli_end_to_end_on_the_fixture_tree(tmp_path, dataset):
    root = make_tree(dataset, tmp_path / dataset)
    args = ["--dataset", dataset, "--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--exp_name", "r"]
    proc = run_main(*args, *CLI, "--num_workers", "0")
    num_classes, sizes = END_TO_END[dataset]
    assert sizes in proc.stdout
    final = json.loads((tmp_path / "runs/r/final.json").read_text())
    assert 0 <= final["test_map"] <= 100 and len(final["test_ap_per_class"]) == num_classes
    if dataset == "openimages":
        # test classes with an annotated entry: 0 1 4 5 1500 2500 3500; every other class is skipped (None)
        scored = [i for i, ap in enumerate(final["test_ap_per_class"]) if ap is not None]
        assert scored == [0, 1, 4, 5, 1500, 2500, 3500]
        assert sorted(final["test_group_map"]) == ["G1", "G2", "G3", "G4", "G5"]
        assert all(math.isfinite(v) for v in final["test_group_map"].values())
        assert final["test_group_map"]["G3"] == 0.0  # its only scored class, 2500, has a negative and no positive
    else:
        assert "test_group_map" not in final
    if dataset == "nuswide":  # the rows without a positive (see the build_data test above) are kept and counted
        assert "images without any positive label (kept, as the official tools keep them): train 1 of 8" in proc.stdout
    assert (root / "formatted_train_images.npy").exists()


# ----------------------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("dataset", ["pascal", "coco", "cub", "nuswide", "openimages"])
def test_missing_data_folder_gives_a_clear_message(tmp_path, capsys, dataset):
    argv = ["--dataset", dataset, "--data_root", str(tmp_path / "nothing"), "--save_path", str(tmp_path), *CLI]
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data/README.md" in err and f"data/{dataset}/README.md" in err


@pytest.mark.slow  # runs main.py or several processes
def test_missing_data_folder_from_the_command_line(tmp_path):
    proc = run_cli(
        "--dataset", "pascal", "--data_root", str(tmp_path / "nothing"), "--save_path", str(tmp_path), *CLI, check=False
    )
    assert proc.returncode == 1 and "data/README.md" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # runs main.py or several processes
def test_a_missing_listed_image_is_counted_and_shown(tmp_path):
    root = make_pascal(tmp_path / "pascal")
    (root / "VOCdevkit/VOC2012/JPEGImages/2009_000001.jpg").unlink()
    args = ["--dataset", "pascal", "--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--exp_name", "m"]
    proc = run_main(*args, *CLI, "--num_workers", "0", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # train 4 + val 1 + test 3 = 8 listed images, one of them missing
    assert "1 of 8 listed images are missing" in proc.stderr
    assert str(root / "VOCdevkit/VOC2012/JPEGImages/2009_000001.jpg") in proc.stderr
    assert not (tmp_path / "runs/m").exists()  # a data error leaves no run folder


@pytest.mark.slow  # runs main.py or several processes
@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_undecodable_image_names_the_file(tmp_path, workers):
    root = make_pascal(tmp_path / "pascal")
    # train row 2; RandomState(1200).permutation(5) = [4 2 0 1 3] puts rows 0 1 2 4 in train: read in epoch 1
    bad = root / "VOCdevkit/VOC2012/JPEGImages/2008_000015.jpg"
    bad.write_bytes(b"this is not a jpeg")
    args = ["--dataset", "pascal", "--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--exp_name", "g"]
    proc = run_cli(*args, *CLI, "--num_workers", workers, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"Cannot decode image {bad}" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_fixture_images_are_real_jpegs(tmp_path):
    write_jpeg(tmp_path / "x.jpg", 3)
    image = loaders.load_image(str(tmp_path / "x.jpg"), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
