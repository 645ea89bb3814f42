"""Raw official annotations -> formatted files -> observed (single positive) labels -> splits -> image loaders.

The rules that decide the numbers follow the official tools exactly (Cole et al.'s formatting scripts, which the
LL authors' release uses): each dataset's rows, row order, columns and file names; the observed-label generator;
the 80/20 split of the official train split and the optional subsampling. They are pure functions of the
annotations or of a label matrix, tested without any image.
Images are decoded and resized with PIL exactly as the paper's transforms do; the loader hands uint8 batches to the
trainer, which flips and normalises them on the device (``to_model_input``).
"""

from __future__ import annotations

import tool_io  # first: notes a Ctrl-C while torch imports, under `python datasets.py` (see tool_io)

# isort: split
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import distributed
import files
import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OBSERVED_SEED = 1200  # the official generator's seed, fresh for each split file
NUM_GROUPS = 5  # OpenImages: classes in five groups by number of annotated training positives
COCO_NUM_CLASSES = 80
CUB_NUM_ATTRIBUTES = 312
OPENIMAGES_NUM_CLASSES = 5000


OFFICIAL_DEFAULTS = {"arch": "resnet50", "image_size": 448, "num_epochs": 10}  # the paper's, for every real dataset


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything the tool knows about one dataset, in one place (``DATASET_INFO``): adding a dataset is one entry.

    ``defaults``: the dataset-level training presets (optimiser, learning rate, architecture, image size, epochs), the
    LL authors' published settings for the real datasets. ``formatter(root)`` turns the raw official annotations into
    ``{phase: (names, labels)}``; ``raw_marker`` is a file (relative to the data root) whose presence says they are
    there. ``read_class_names(root)`` gives the column names from the raw files (``[]`` when they are absent).
    ``prepare(root)`` generates the dataset itself (the synthetic one: registered by ``synthetic.py``, which this
    module does not import). ``sparse``: partially annotated labels stored as CSR whose annotated entries are the
    observed labels (OpenImages): no observed-label generator, no full labels, unknown entries not scored.
    """

    num_classes: int
    image_dir: str  # what the names in formatted_*_images.npy are relative to, inside the data root
    title: str  # the dataset's column heading in reports
    defaults: Mapping[str, object]
    # The formatted phases: the official train split and the official validation split (our test set). OpenImages
    # keeps its own validation split for model selection, so it has three.
    phases: tuple[str, ...] = ("train", "val")
    sparse: bool = False  # labels stored as CSR: OpenImages' 3.4M x 5,000 matrix would take 17 GB dense
    formatter: Callable[[Path], dict] | None = None
    raw_marker: str | None = None
    read_class_names: Callable[[Path], list[str]] | None = None
    prepare: Callable[[Path], object] | None = None


def _defaults(optimizer: str, lr: float, **overrides) -> Mapping[str, object]:
    return MappingProxyType({**OFFICIAL_DEFAULTS, "optimizer": optimizer, "lr": lr, **overrides})


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class DataError(Exception):
    """A problem with the user's data that the user can fix; the message says what and how."""


# ---------------------------------------------------------------------------------------------------------------------
# The official rules (pure functions).


def _signed_dtype(dtype: np.dtype) -> np.dtype:
    """The input's dtype when it can hold -1 (float, signed int), else int8: bool or unsigned labels must never turn
    -1 into True or overflow."""
    return dtype if dtype.kind in "fi" else np.dtype(np.int8)


def observe_labels(
    label_matrix: np.ndarray, num_pos: int = 1, num_neg: int = 0, seed: int = OBSERVED_SEED
) -> np.ndarray:
    """The official observed-label generator, element for element.

    0 is mapped to -1; one ``RandomState(seed)`` serves every row in order: shuffle the row's positive indices and keep
    the first ``num_pos`` as +1, then shuffle its negative indices (always, even when ``num_neg`` is 0, because that
    consumes random state) and keep the first ``num_neg`` as -1. Everything else is 0 (unobserved). The output keeps
    the input's dtype, like the official files (int8 for bool or unsigned input, which cannot hold -1).
    """
    if num_pos < 0 or num_neg < 0:
        raise ValueError("num_pos and num_neg must be >= 0")
    signed = np.where(label_matrix > 0, 1, -1).astype(_signed_dtype(label_matrix.dtype))
    observed = np.zeros_like(signed)
    rng = np.random.RandomState(seed)
    for i in range(signed.shape[0]):
        for value, count in ((1, num_pos), (-1, num_neg)):
            idx = np.nonzero(signed[i] == value)[0]
            rng.shuffle(idx)
            observed[i, idx[:count]] = value
    return observed


def observe_label_proportion(label_matrix: np.ndarray, proportion: float, seed: int = OBSERVED_SEED) -> np.ndarray:
    """Each label of each image known with probability ``proportion`` (the partial-label regime of Durand et al.,
    CVPR 2019): known positives +1, known negatives -1, the rest 0.

    Draw order: one ``RandomState(seed)`` per label file, one ``random_sample(N * C)`` call, the uniforms assigned in
    row-major order (row 0's classes 0..C-1, then row 1, ...); entry (i, c) is known when its uniform is
    ``< proportion``. The output dtype follows ``observe_labels``.
    """
    if not 0 < proportion <= 1:
        raise ValueError("proportion must lie in (0, 1]")
    signed = np.where(label_matrix > 0, 1, -1).astype(_signed_dtype(label_matrix.dtype))
    known = np.random.RandomState(seed).random_sample(signed.size).reshape(signed.shape) < proportion
    return np.where(known, signed, 0).astype(signed.dtype)


@dataclass(frozen=True)
class Regime:
    """How the observed training labels are drawn from the full labels. The default, one positive per image and no
    negative, is the paper's (single positive) and the only regime it reports."""

    num_pos: int = 1
    num_neg: int = 0
    proportion: float | None = None  # when set: each label known with this probability (num_pos/num_neg unused)

    @property
    def tag(self) -> str:
        """Empty for the paper's regime; ``p2n1`` (2 positives, 1 negative) or ``prop0.3`` otherwise."""
        if self.proportion is not None:
            return f"prop{self.proportion:g}"
        return "" if (self.num_pos, self.num_neg) == (1, 0) else f"p{self.num_pos}n{self.num_neg}"

    def file(self, phase: str) -> str:
        """The observed-label file: the official name for the paper's regime (files from the official tools are used
        unchanged), its own name for any other, so regimes never mix."""
        return f"formatted_{phase}_labels_obs{'_' + self.tag if self.tag else ''}.npy"

    def describe(self) -> str:
        if self.proportion is not None:
            return f"each label known with probability {self.proportion:g}"
        if (self.num_pos, self.num_neg) == (1, 0):
            return "single positive (the paper's regime)"
        return f"{self.num_pos} positive(s) and {self.num_neg} negative(s) per image"

    def observe(self, labels: np.ndarray) -> np.ndarray:
        if self.proportion is not None:
            return observe_label_proportion(labels, self.proportion)
        return observe_labels(labels, self.num_pos, self.num_neg)


def regime_of(cfg) -> Regime:
    """The regime a config asks for: ``cfg.num_pos`` (default 1), ``cfg.num_neg`` (0), ``cfg.label_proportion``
    (None: off). Raises DataError naming the flag for an impossible combination."""
    num_pos, num_neg = getattr(cfg, "num_pos", 1), getattr(cfg, "num_neg", 0)
    proportion = getattr(cfg, "label_proportion", None)
    if proportion is not None:
        if (num_pos, num_neg) != (1, 0):
            raise DataError("--label_proportion draws every label with one probability; it cannot be combined with "
                            "--num_pos or --num_neg. Give one or the other.")  # fmt: skip
        if not 0 < proportion <= 1:
            raise DataError(f"--label_proportion must lie in (0, 1] (got {proportion}).")
        return Regime(proportion=float(proportion))
    if num_pos < 0 or num_neg < 0 or num_pos + num_neg == 0:
        raise DataError(f"--num_pos {num_pos} --num_neg {num_neg} observes no label: both must be >= 0 and at least "
                        "one positive (the paper: --num_pos 1 --num_neg 0).")  # fmt: skip
    return Regime(int(num_pos), int(num_neg))


def split_indices(num_images: int, val_frac: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The official train/val split of the official train split: sorted index arrays (train, val)."""
    n_val = int(np.round(val_frac * num_images))
    if not 0 < n_val < num_images:
        if num_images < 2:
            raise DataError(f"The official train split has {num_images} image(s): too few to hold out a validation "
                            "split. Check the formatted train files.")  # fmt: skip
        part = "validation" if n_val <= 0 else "training"
        raise DataError(
            f"--val_frac {val_frac} leaves an empty {part} split (round({val_frac} x {num_images} images) = {n_val} "
            f"held out). Use a --val_frac between {1 / num_images:.3g} and {1 - 1 / num_images:.3g} (the paper: 0.2)."
        )
    perm = np.random.RandomState(split_seed).permutation(num_images)
    return np.sort(perm[: num_images - n_val]), np.sort(perm[-n_val:])


def subsample_indices(
    train_idx: np.ndarray, val_idx: np.ndarray, frac_train: float, frac_val: float, ss_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The official optional subsampling: one RandomState for train then val, applied even when a fraction is 1."""
    rng = np.random.RandomState(ss_seed)
    out = []
    for idx, frac, flag in ((train_idx, frac_train, "--ss_frac_train"), (val_idx, frac_val, "--ss_frac_val")):
        keep = int(np.round(frac * len(idx)))
        if keep == 0:
            raise DataError(
                f"{flag} {frac} keeps no image: round({frac} x {len(idx)} images) = 0. Use {flag} of at least "
                f"{1 / len(idx):.3g} (1 keeps them all)."
            )
        out.append(idx[np.sort(rng.permutation(len(idx))[:keep])])
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------------
# Sparse labels (OpenImages).


class SparseLabels:
    """An N x C matrix of -1/0/+1 labels stored as CSR: per row, the annotated classes and their values.

    0 means unknown and is not stored. Rows are densified per batch (``dense``), so the whole matrix never is.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, num_classes: int) -> None:
        self.indptr, self.indices, self.values, self.num_classes = indptr, indices, values, num_classes

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.num_classes)

    @classmethod
    def from_entries(cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_rows: int, num_classes: int):
        """From (row, class, value) triples in any order; a duplicated entry keeps its largest value."""
        order = np.lexsort((-values.astype(np.int16), cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        rows, cols, values = rows[first], cols[first], values[first]
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
        return cls(
            indptr, cols.astype(np.int16 if num_classes < 2**15 else np.int32), values.astype(np.int8), num_classes
        )

    def rows(self, idx: np.ndarray) -> SparseLabels:
        """The sub-matrix of the given rows, in that order."""
        starts, ends = self.indptr[idx], self.indptr[np.asarray(idx) + 1]
        lengths = ends - starts
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return SparseLabels(indptr, self.indices[take], self.values[take], self.num_classes)

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, class, value) of every stored entry."""
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        return rows, self.indices.astype(np.int64), self.values

    def dense(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as a dense int8 len(idx) x C array."""
        sub = self.rows(np.asarray(idx))
        out = np.zeros((len(idx), self.num_classes), dtype=np.int8)
        rows, cols, values = sub.entries()
        out[rows, cols] = values
        return out

    def positives_per_class(self) -> np.ndarray:
        return np.bincount(self.indices[self.values > 0].astype(np.int64), minlength=self.num_classes)

    def with_positives(self, rows: np.ndarray, cols: np.ndarray) -> SparseLabels:
        """A copy where the given entries are +1 (LL-Cp's permanent corrections)."""
        all_rows, all_cols, all_values = self.entries()
        return SparseLabels.from_entries(
            np.concatenate([all_rows, rows]),
            np.concatenate([all_cols, cols]),
            np.concatenate([all_values, np.ones(len(rows), dtype=np.int8)]),
            len(self),
            self.num_classes,
        )

    _PARTS = ("indptr", "indices", "values")

    @staticmethod
    def files(phase: str) -> list[str]:
        return [f"formatted_{phase}_labels_{part}.npy" for part in SparseLabels._PARTS]

    def save(self, root: Path, phase: str) -> None:
        for name, part in zip(self.files(phase), self._PARTS, strict=True):
            files.save_npy_atomic(root / name, getattr(self, part))

    @classmethod
    def load(cls, root: Path, phase: str, num_classes: int) -> SparseLabels:
        paths = [root / name for name in cls.files(phase)]
        fix = (f"Delete {', '.join(str(p) for p in paths)} and format again from the raw annotations "
               "(data/openimages/README.md).")  # fmt: skip
        parts = [load_npy(path, fix) for path in paths]
        indptr, indices, values = parts
        ok = (
            indptr.ndim == indices.ndim == values.ndim == 1 and len(indptr) > 0 and indptr[0] == 0
            and all(p.dtype.kind in "iu" for p in parts) and len(indices) == len(values) == indptr[-1]
            and (np.diff(indptr) >= 0).all() and np.isin(values, (-1, 1)).all()
            and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < num_classes))
        )  # fmt: skip
        if not ok:
            raise DataError(f"The sparse label files formatted_{phase}_labels_*.npy in {root} are inconsistent. {fix}")
        return cls(*parts, num_classes)


# ---------------------------------------------------------------------------------------------------------------------
# Raw official annotations -> formatted files, with the official tools' rows, order, columns, names and dtypes.


def format_pascal(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """VOC 2012 from ``VOCdevkit/VOC2012/ImageSets/Main/<class>_<split>.txt``.

    An image is positive for a class when its flag is 1 (0, "difficult", is not positive); only images with a positive
    are kept; rows sorted by file name. As the official script, one dictionary of seen images serves both splits, so
    an image listed in both would stay in the first only (VOC's train and val are disjoint).
    """
    main = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    classes_of: dict[str, list[int]] = {}
    out = {}
    for phase in ("train", "val"):
        names = []
        for index, name in enumerate(VOC_CLASSES):
            for image_id, flag in _parsed(main / f"{name}_{phase}.txt", 2, lambda f: (f[0], _voc_flag(f[-1]))):
                if flag == 1:
                    file_name = image_id + ".jpg"
                    if file_name not in classes_of:
                        classes_of[file_name] = []
                        names.append(file_name)
                    classes_of[file_name].append(index)
        names.sort()
        labels = np.zeros((len(names), len(VOC_CLASSES)))
        for row, file_name in enumerate(names):
            labels[row, classes_of[file_name]] = 1.0
        out[phase] = (np.array(names), labels)
    return out


def _voc_flag(text: str) -> int:
    """A VOC class-list flag: 1 present, -1 absent, 0 difficult; anything else is a damaged line (ValueError)."""
    flag = int(text)
    if flag not in (-1, 0, 1):
        raise ValueError(text)
    return flag


def format_coco(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """COCO 2014 from ``annotations/instances_{train,val}2014.json``.

    Rows: the images with at least one instance annotation (crowd included), ordered by image id *as strings*;
    columns: the ``categories`` list in file order (ids have gaps); names ``train2014/COCO_train2014_%012d.jpg``.
    """
    out, categories = {}, None
    for phase in ("train", "val"):
        path = root / "annotations" / f"instances_{phase}2014.json"
        print(f"[coco] reading {path} ...")
        data = _read_coco_json(path)
        ids_here = [c["id"] for c in data["categories"]]
        if categories is None:
            categories = ids_here
        elif categories != ids_here:
            raise DataError(f"{path} lists other categories than the train annotations; use the official 2014 files.")
        column = {cat_id: i for i, cat_id in enumerate(categories)}
        ids = sorted({str(a["image_id"]) for a in data["annotations"]})
        row = {int(image_id): i for i, image_id in enumerate(ids)}
        labels = np.zeros((len(ids), len(categories)))
        for a in data["annotations"]:
            labels[row[int(a["image_id"])], column[int(a["category_id"])]] = 1.0
        names = np.array([f"{phase}2014/COCO_{phase}2014_{int(i):012d}.jpg" for i in ids])
        out[phase] = (names, labels)
    return out


def _read_coco_json(path: Path) -> dict:
    """A COCO 2014 instances file, checked for what ``format_coco`` reads: a half-downloaded file or another JSON is a
    DataError naming the file, before anything is written."""
    fix = f"Download the COCO 2014 annotations again and extract {path.name} in place (data/coco/README.md)."
    try:
        with open(_existing(path), "rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{path} is not valid JSON ({err}): it is incomplete or damaged (an interrupted download?). "
                        f"{fix}") from None  # fmt: skip
    problem = None
    not_lists = [] if not isinstance(data, dict) else [
        key for key in ("annotations", "images", "categories") if key in data and not isinstance(data[key], list)
    ]  # fmt: skip
    if not isinstance(data, dict) or not {"annotations", "categories"} <= data.keys():
        problem = "it has no 'annotations' and 'categories' lists"
    elif not_lists:
        problem = f"its '{not_lists[0]}' is {json.dumps(data[not_lists[0]])[:60]}, not a list"
    elif not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in data["categories"]):
        problem = "its categories are not objects with an integer 'id'"
    elif not len(data["categories"]) == len({c["id"] for c in data["categories"]}) == COCO_NUM_CLASSES:
        problem = f"it lists {len(data['categories'])} categories, not the 80 distinct ones of COCO 2014"
    else:
        known = {c["id"] for c in data["categories"]}
        for a in data["annotations"]:
            if not (isinstance(a, dict) and _json_int(a.get("image_id"))):
                problem = f"an annotation has no integer image_id: {str(a)[:120]}"
            elif not _json_int(a.get("category_id")) or a["category_id"] not in known:  # true would pass as 1
                problem = f"an annotation has category_id {a.get('category_id')!r}, which its categories do not list"
            if problem:
                break
    if problem:
        raise DataError(f"{path} is not a COCO 2014 instances file: {problem}. Nothing was written. {fix}")
    return data


def _json_int(value) -> bool:
    """An integer in a JSON file: JSON's true and false are Python ints too."""
    return isinstance(value, int) and not isinstance(value, bool)


def format_cub(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CUB-200-2011: the 312 attributes' ``is_present`` from ``attributes/image_attribute_labels.txt``, images in
    ``images.txt`` order, split by ``train_test_split.txt`` (1 = train, else test). Some lines of the real label file
    carry extra fields; only the first three (image id, attribute id, is_present) are read."""
    cub = root / "CUB_200_2011"
    images_path = cub / "images.txt"
    images, line_of = [], {}
    # id, then the rest of the line: a path keeps its spaces (two in a row included)
    for number, (image_id, name) in _parsed_lines(images_path, 2, lambda f: (int(f[0]), f[1].rstrip()), maxsplit=1):
        if image_id in line_of:  # else its labels would all go to one of the two rows
            raise DataError(f"{images_path} lists the image id {image_id} twice (lines {line_of[image_id]} and "
                            f"{number}): each image has its own id. Use the official CUB_200_2011 files "
                            "(data/cub/README.md).")  # fmt: skip
        line_of[image_id] = number
        images.append((image_id, name))
    image_row = {image_id: i for i, (image_id, _) in enumerate(images)}
    is_train = dict(_parsed(cub / "train_test_split.txt", 2, lambda f: (int(f[0]), int(f[1]) == 1)))
    labels = np.full((len(images), CUB_NUM_ATTRIBUTES), -1, dtype=np.int64)
    path = cub / "attributes" / "image_attribute_labels.txt"
    for number, (image_id, attribute_id, is_present) in _parsed_lines(path, 3, lambda f: tuple(map(int, f[:3]))):
        if image_id not in image_row or not 1 <= attribute_id <= CUB_NUM_ATTRIBUTES or is_present not in (0, 1):
            raise DataError(f"{path}: the line '{image_id} {attribute_id} {is_present} ...' names an image not in "
                            f"images.txt, an attribute outside 1..{CUB_NUM_ATTRIBUTES} or a value other than 0/1. Use "
                            "the official CUB_200_2011 files (data/cub/README.md).")  # fmt: skip
        row = image_row[image_id]
        if labels[row, attribute_id - 1] == 1 - is_present:  # a repeated line that agrees changes nothing
            raise DataError(f"{path}: line {number} gives image {image_id}, attribute {attribute_id} the value "
                            f"{is_present}, and an earlier line gave it {1 - is_present}. Use the official "
                            "CUB_200_2011 files (data/cub/README.md).")  # fmt: skip
        labels[row, attribute_id - 1] = is_present
    if (labels < 0).any():
        row, col = np.argwhere(labels < 0)[0]
        raise DataError(f"image_attribute_labels.txt has no line for image {images[row][0]}, attribute {col + 1}.")
    unsplit = [image_id for image_id, _ in images if image_id not in is_train]
    if unsplit:
        raise DataError(f"{cub / 'train_test_split.txt'} has no line for image {unsplit[0]} ({len(unsplit)} images "
                        "missing). Use the official CUB_200_2011 files (data/cub/README.md).")  # fmt: skip
    train = np.array([is_train[image_id] for image_id, _ in images])
    names = np.array([name.strip() for _, name in images])
    return {"train": (names[train], labels[train]), "val": (names[~train], labels[~train])}


OPENIMAGES_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def format_openimages(root: Path) -> dict[str, tuple[np.ndarray, SparseLabels]]:
    """OpenImages V3 (2017_11) human-verified image-level labels as sparse -1/+1 matrices.

    Columns: ``2017_11/classes-trainable.txt`` in file order (5,000 classes). Rows: the images of
    ``2017_11/<split>/annotations-human.csv`` with at least one annotation of a trainable class, sorted by ImageID.
    Confidence 1 = present (+1), 0 = verified absent (-1); everything else stays unknown (0, not stored). A class
    annotated both ways for one image counts as present. Image names ``images_<train|val|test>/<ImageID>.jpg``.
    """
    base = root / "2017_11"
    classes_path = base / "classes-trainable.txt"
    listed = [(number, line.strip()) for number, line in enumerate(_read_lines(classes_path), 1) if line.strip()]
    classes = [mid for _, mid in listed]
    if len(classes) != OPENIMAGES_NUM_CLASSES:
        raise DataError(f"{classes_path} lists {len(classes)} classes; the 2017_11 release (V3) has "
                        f"{OPENIMAGES_NUM_CLASSES}. Use that release's file.")  # fmt: skip
    line_of: dict[str, int] = {}
    for number, mid in listed:
        if mid in line_of:  # one of the two columns would get no label
            raise DataError(f"{classes_path} lists the class {mid} twice (lines {line_of[mid]} and {number}); the "
                            f"2017_11 release (V3) lists each of its {OPENIMAGES_NUM_CLASSES} classes once. Use that "
                            "release's file (data/openimages/README.md).")  # fmt: skip
        line_of[mid] = number
    column = {mid: i for i, mid in enumerate(classes)}
    out = {}
    for phase, folder in OPENIMAGES_SPLITS.items():
        ids, cols, values = _read_openimages_csv(_existing(base / folder / "annotations-human.csv"), column)
        unique_ids, rows = np.unique(ids, return_inverse=True)
        labels = SparseLabels.from_entries(rows.ravel(), cols, values, len(unique_ids), len(classes))
        del rows, ids, cols, values
        names = np.char.add(np.char.add(f"images_{phase}/".encode(), _hex_ids(unique_ids)), b".jpg")
        out[phase] = (names, labels)
    return out


def _read_openimages_csv(path: Path, column: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageID (as uint64), class column and +-1 of each trainable-class line; compact arrays, a progress bar."""
    ids, cols, values = array("Q"), array("i"), array("b")
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=path.name) as bar:
        header = f.readline()
        bar.update(len(header))
        fields = header.decode(errors="replace").strip().split(",")
        try:
            i_id, i_label, i_conf = fields.index("ImageID"), fields.index("LabelName"), fields.index("Confidence")
        except ValueError:
            raise DataError(f"{path} does not start with the header ImageID,Source,LabelName,Confidence.") from None
        for number, line in enumerate(f, start=2):
            bar.update(len(line))
            parts = line.split(b",")
            try:
                if len(parts) != len(fields):
                    raise ValueError
                col = column.get(parts[i_label].decode())
                if col is None:
                    continue
                conf = float(parts[i_conf])
            except (ValueError, UnicodeDecodeError):
                if not line.strip():
                    continue
                raise DataError(
                    f"{path}, line {number}: {line[:100]!r} is not a complete {','.join(fields)} line: the file is cut "
                    "short or damaged (an interrupted download?). Download it again (data/openimages/README.md)."
                ) from None
            if not 0 <= conf <= 1:  # a probability (the human labels: 0 or 1); nan is none
                raise DataError(f"{path}, line {number}: Confidence {parts[i_conf].strip().decode(errors='replace')!r} "
                                "is not a probability in [0, 1]: "
                                "the file is damaged, or not the official one. Download it again "
                                "(data/openimages/README.md).")  # fmt: skip
            try:
                ids.append(int(parts[i_id], 16))
            except (ValueError, OverflowError):  # OverflowError: negative, or more than 64 bits
                raise DataError(
                    f"{path}, line {number}: ImageID {parts[i_id]!r} is not a 16-digit hex id: the file is damaged, or "
                    "not the official one. Download it again (data/openimages/README.md)."
                ) from None
            cols.append(col)
            values.append(1 if conf > 0.5 else -1)
    return np.frombuffer(ids, np.uint64), np.frombuffer(cols, np.int32), np.frombuffer(values, np.int8)


def _hex_ids(ids: np.ndarray) -> np.ndarray:
    """uint64 -> 16 lowercase hex digits as bytes (OpenImages ImageIDs), vectorised."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    nibbles = (ids[:, None] >> shifts) & np.uint64(15)
    return digits[nibbles.astype(np.int64)].view("S16").ravel()


def _parsed(path: Path, count: int, parse: Callable[[list[str]], object]) -> Iterator:
    """``parse(fields)`` of each non-blank line's whitespace-separated fields; a line with fewer than ``count`` fields,
    or one ``parse`` fails on (ValueError), is a DataError naming the file and the line."""
    return (value for _, value in _parsed_lines(path, count, parse))


def _parsed_lines(path: Path, count: int, parse: Callable[[list[str]], object], maxsplit: int = -1) -> Iterator:
    """``(line number, parse(fields))`` as ``_parsed``; with ``maxsplit``, the line is split that many times at most
    (the last field is the rest of the line, its inner spaces kept)."""
    number, line = 0, ""
    try:
        for number, line in enumerate(_read_lines(path), start=1):  # noqa: B007 (the message names the line)
            fields = line.split(maxsplit=maxsplit)
            if not fields:
                continue
            if len(fields) < count:
                raise ValueError
            yield number, parse(fields)
    except ValueError:
        raise DataError(
            f"{path}, line {number}: {line[:100]!r} cannot be read: the file is cut short or damaged, or "
            "not the official one. Extract it again from the official archive (data/README.md)."
        ) from None


def _read_lines(path: Path) -> list[str]:
    try:
        return _existing(path).read_text().splitlines()
    except UnicodeDecodeError as err:  # before any line is read: name the byte, not "line 0"
        raise DataError(
            f"{path} is not a text file (its byte {err.start} cannot be decoded: {err.reason}): the file is damaged, "
            "or not the official one. Extract it again from the official archive (data/README.md)."
        ) from None


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"Missing {path}. See data/README.md for the files each dataset needs.")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Class names from the raw files (for figures and predictions; the formatted files carry none).


def _coco_class_names(root: Path) -> list[str]:
    path = root / "annotations" / "instances_val2014.json"
    if not path.exists():
        return []
    try:
        with open(path) as f:
            return [c["name"] for c in json.load(f)["categories"]]
    except (ValueError, KeyError, TypeError):  # not the COCO file: the names stay "class <i>"
        return []


def _listed_names(file: str, part: int | None = None) -> Callable[[Path], list[str]]:
    def read(root: Path) -> list[str]:
        path = root / file
        if not path.exists():
            return []
        lines = [line.strip() for line in _read_lines(path) if line.strip()]
        return [line.split(maxsplit=1)[part] if part is not None else line for line in lines]

    return read


def _openimages_class_names(root: Path) -> list[str]:
    descriptions = root / "2017_11" / "class-descriptions.csv"
    if not descriptions.exists():
        return []
    described = dict(line.split(",", 1) for line in _read_lines(descriptions) if "," in line)
    mids = [line.strip() for line in _read_lines(root / "2017_11" / "classes-trainable.txt") if line.strip()]
    return [described.get(mid, mid).strip().strip('"') for mid in mids]


def _synthetic_class_names(root: Path) -> list[str]:
    """The generator writes its class names into ``synthetic.json`` beside the images."""
    try:
        return list(json.loads((root / "synthetic.json").read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ---------------------------------------------------------------------------------------------------------------------
# The datasets: one entry each.

DATASET_INFO: dict[str, DatasetInfo] = {
    "pascal": DatasetInfo(
        20, "VOCdevkit/VOC2012/JPEGImages", "VOC12", _defaults("sgd", 5e-3),
        formatter=format_pascal, raw_marker="VOCdevkit/VOC2012/ImageSets/Main/aeroplane_train.txt",
        read_class_names=lambda root: list(VOC_CLASSES),
    ),
    "coco": DatasetInfo(
        COCO_NUM_CLASSES, "", "COCO14", _defaults("adam", 1e-5),
        formatter=format_coco, raw_marker="annotations/instances_train2014.json", read_class_names=_coco_class_names,
    ),
    # NUS-WIDE comes as formatted files (Cole et al.'s re-crawled subset): no raw form here.
    "nuswide": DatasetInfo(81, "Flickr", "NUS-WIDE", _defaults("adam", 1e-5), read_class_names=_listed_names(
        "Concepts81.txt")),
    "cub": DatasetInfo(
        CUB_NUM_ATTRIBUTES, "CUB_200_2011/images", "CUB", _defaults("adam", 7.5e-5),
        formatter=format_cub, raw_marker="CUB_200_2011/attributes/image_attribute_labels.txt",
        read_class_names=_listed_names("attributes.txt", part=1),
    ),
    # The paper publishes no OpenImages settings: COCO's, the closest large-scale setting, as a starting point.
    "openimages": DatasetInfo(
        OPENIMAGES_NUM_CLASSES, "", "OpenImages", _defaults("adam", 1e-5), ("train", "val", "test"), sparse=True,
        formatter=format_openimages, raw_marker="2017_11/classes-trainable.txt",
        read_class_names=_openimages_class_names,
    ),
    # Generated by synthetic.py, which registers its generator as ``prepare`` (register_prepare). Its defaults were
    # tuned for the embedded demo (docs/synthetic.md).
    "synthetic": DatasetInfo(
        16, "images", "synthetic", _defaults("adam", 1e-3, arch="smallcnn", image_size=32),
        read_class_names=_synthetic_class_names,
    ),
}  # fmt: skip


def register_prepare(dataset: str, prepare: Callable[[Path], object]) -> None:
    """Set the function that generates ``dataset`` under a data root (called before its formatted files are read).
    ``synthetic.py`` registers its generator this way, so this module needs no import of it."""
    DATASET_INFO[dataset] = dataclasses.replace(DATASET_INFO[dataset], prepare=prepare)


def formatted_files(dataset: str) -> list[str]:
    """The files ``format_dataset`` writes (observed labels excluded: the loader generates those)."""
    info = DATASET_INFO[dataset]
    label_files = SparseLabels.files if info.sparse else (lambda phase: [f"formatted_{phase}_labels.npy"])
    return [name for phase in info.phases for name in [f"formatted_{phase}_images.npy", *label_files(phase)]]


def find_file(name: str, root: Path, derived: Path | None = None) -> Path:
    """Where a formatted or observed-label file is read from: the data root when it holds it, else the folder of
    derived files (``derived_dir``), which is also where the tool writes the ones it makes."""
    if derived is None or (root / name).exists():
        return root / name
    return derived / name if (derived / name).exists() else root / name


def format_dataset(name: str, root: str | os.PathLike, derived: str | os.PathLike | None = None) -> None:
    """Read the raw official annotations under ``root`` and write the formatted files that are missing.

    Files that exist (in ``root`` or ``derived``) are never rewritten (the official tools' files, or an earlier
    run's); new ones go to ``derived`` (default: ``root``). The formatter's output is checked (rows, classes, values)
    before anything is written, so formatted files judged wrong are never left behind. NUS-WIDE and the synthetic
    dataset have no raw form here: NUS-WIDE comes as formatted files (Cole et al.'s re-crawled subset).
    """
    root = Path(root)
    out = Path(derived) if derived is not None else root
    info = DATASET_INFO[name]
    missing = [f for f in formatted_files(name) if not find_file(f, root, out).exists()]
    if not missing:
        return
    for phase in info.phases:  # the three parts of a sparse matrix only make sense together
        parts = SparseLabels.files(phase) if info.sparse else []
        present = [str(find_file(f, root, out)) for f in parts if find_file(f, root, out).exists()]
        if 0 < len(present) < len(parts):
            raise DataError(f"Only some of the parts {', '.join(parts)} exist ({', '.join(present)}). Delete "
                            f"{' and '.join(present)} and run again to format the raw annotations anew.")  # fmt: skip
    if info.formatter is None or not (root / info.raw_marker).exists():
        raise DataError(_missing_data_message(name, root, missing))
    print(f"[{name}] formatting the raw annotations in {root} (once) ...")
    formatted = info.formatter(root)
    for phase, (names, labels) in formatted.items():
        _check_formatted_output(name, root, phase, names, labels)
    found = repeated_name({phase: names for phase, (names, _) in formatted.items()})
    if found is not None:
        image, places = found
        phases = list(dict.fromkeys(phase for phase, _ in places))
        if len(phases) == 1:
            where = f"{len(places)} times in the {phases[0]} split"
        else:
            where = f"in both the {phases[0]} and the {phases[1]} split"
        raise DataError(
            f"The raw annotations in {root} list the image {image!r} {where}: they are not the official {info.title} "
            f"files. Nothing was written. Use the files data/{name}/README.md names."
        )
    out.mkdir(parents=True, exist_ok=True)
    for phase, (names, labels) in formatted.items():
        if not find_file(f"formatted_{phase}_images.npy", root, out).exists():
            files.save_npy_atomic(out / f"formatted_{phase}_images.npy", names)
        if isinstance(labels, SparseLabels):
            if not any(find_file(f, root, out).exists() for f in SparseLabels.files(phase)):
                labels.save(out, phase)
        elif not find_file(f"formatted_{phase}_labels.npy", root, out).exists():
            files.save_npy_atomic(out / f"formatted_{phase}_labels.npy", labels)
    where = "" if out == root else f" in {out}"
    print(f"[{name}] wrote {', '.join(missing)}{where}")


def _check_formatted_output(dataset: str, root: Path, phase: str, names: np.ndarray, labels) -> None:
    """What a formatter made must have the dataset's class count, one label row per image and at least one image;
    otherwise the raw files are not the official ones, and nothing is written."""
    info = DATASET_INFO[dataset]
    num_classes = labels.num_classes if isinstance(labels, SparseLabels) else labels.shape[1]
    problem = None
    if num_classes != info.num_classes:
        problem = f"{num_classes} classes, but {info.title} has {info.num_classes}"
    elif len(names) != len(labels):
        problem = f"{len(names)} image names but {len(labels)} label rows in the {phase} split"
    elif len(names) == 0:
        problem = f"no image in the {phase} split"
    if problem:
        raise DataError(f"The raw annotations in {root} give {problem}: they are not the official {info.title} files. "
                        f"Nothing was written. Use the files data/{dataset}/README.md names.")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Formatted files -> splits.


def _missing_data_message(dataset: str, root: Path, missing: list[str]) -> str:
    return (
        f"No formatted {dataset} data in {root} (missing: {', '.join(missing)}), and no raw annotations to make them "
        f"from.\nSee data/README.md (and data/{dataset}/README.md) for where to download {dataset} and how to lay it "
        "out, or point --data_root at the folder that holds it."
    )


def _formatted_fix(dataset: str, root: Path, paths: list[Path]) -> str:
    """What to do about formatted files that are wrong: which to delete, and what then makes them anew."""
    info = DATASET_INFO[dataset]
    listed = " and ".join(str(p) for p in paths)
    if info.formatter is not None and (root / info.raw_marker).exists():
        return f"Delete {listed} and run again: the next run formats them anew from the raw annotations in {root}."
    if info.prepare is not None:
        return f"Delete {listed} and run again: the next run generates the dataset anew."
    return f"Replace {listed} with the files data/{dataset}/README.md describes."


def load_npy(path: Path, fix: str) -> np.ndarray:
    """``np.load`` without pickles, every failure a DataError naming the file, what is wrong and ``fix``."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"Missing {path}. {fix}") from None
    except PermissionError:
        raise
    except EOFError:
        raise DataError(f"{path} is empty (zero bytes or cut short). {fix}") from None
    except (ValueError, OSError) as err:
        reason = (
            "it holds Python objects (a pickle), which are never loaded"
            if "pickle" in str(err) or "Object arrays" in str(err)
            else f"it is cut short or damaged ({err})"
        )
        raise DataError(f"{path} is not a readable numpy array: {reason}. {fix}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DataError(f"{path} is an .npz archive, not a single .npy array. {fix}")
    return array


def _check_labels(path: Path, labels: np.ndarray, num_images: int, num_classes: int, allowed: tuple, fix: str) -> None:
    if labels.dtype.kind not in "buif":
        raise DataError(f"{path} holds {labels.dtype} values, not numbers. {fix}")
    if labels.ndim != 2 or labels.shape[0] != num_images or labels.shape[1] != num_classes:
        raise DataError(
            f"{path} has shape {labels.shape}, but the images file lists {num_images} images and the dataset has "
            f"{num_classes} classes. The formatted files disagree. {fix}"
        )
    bad = ~np.isin(labels, allowed)
    if bad.any():
        raise DataError(
            f"{path} holds values other than {allowed} ({int(bad.sum())} entries, e.g. {labels[bad][0]!r}). {fix}"
        )


def check_observed(path: Path, observed: np.ndarray, labels: np.ndarray) -> None:
    """An observed-label file must belong to the full labels: same shape, every observed positive a true positive and
    every observed negative a true negative (a file of other formatted files, or rows shifted, fails this)."""
    fix = f"It was made for other formatted files (or its rows are out of order): delete {path} to regenerate it."
    _check_labels(path, observed, labels.shape[0], labels.shape[1], (-1, 0, 1), fix)
    wrong_pos = (observed > 0) & ~(labels > 0)
    wrong_neg = (observed < 0) & (labels > 0)
    for wrong, what in ((wrong_pos, "observed positives that are not true positives"),
                        (wrong_neg, "observed negatives that are true positives")):  # fmt: skip
        if wrong.any():
            row, col = np.argwhere(wrong)[0]
            raise DataError(
                f"{path} does not match the full labels: {int(wrong.sum())} of its {int((observed != 0).sum())} "
                f"observed entries are {what} (the first at row {row}, class {col}). {fix}"
            )


def load_formatted(
    dataset: str, root: str | os.PathLike, derived: str | os.PathLike | None = None, regime: Regime = Regime()
) -> dict[str, dict]:
    """Per phase: ``images`` (names), ``labels`` (full 0/1 matrix, or SparseLabels) and ``labels_obs``.

    Formats the raw annotations first when the formatted files are missing. Observed labels come from the regime's
    file (``formatted_{phase}_labels_obs.npy`` for the paper's), generated with the official generator and cached in
    ``derived`` (default: ``root``) when absent; an existing file (e.g. from the official tools) is used as it is once
    it is checked against the full labels. OpenImages' observed labels are its real partial labels. Label files of
    any numeric dtype (bool and uint8 included) are read as the numbers they hold.
    """
    root = Path(root)
    derived = Path(derived) if derived is not None else root
    info = DATASET_INFO[dataset]
    if info.sparse and regime != Regime():
        raise DataError(f"--num_pos, --num_neg and --label_proportion draw observed labels from full labels; "
                        f"{info.title} has only partial labels (its annotated entries are what is observed). Leave "
                        "them out.")  # fmt: skip
    format_dataset(dataset, root, derived)
    images_of, paths_of = {}, {}
    for phase in info.phases:
        images_path = paths_of[phase] = find_file(f"formatted_{phase}_images.npy", root, derived)
        images = load_npy(images_path, _formatted_fix(dataset, root, [images_path]))
        if images.ndim != 1 or images.dtype.kind not in "US" or len(images) == 0:
            what = "no image names" if images.dtype.kind in "US" and images.ndim == 1 else "no 1-D list of names"
            raise DataError(f"{images_path} holds {what} (shape {images.shape}, dtype {images.dtype}). "
                            f"{_formatted_fix(dataset, root, [images_path])}")  # fmt: skip
        images_of[phase] = images
    _check_distinct_names(dataset, root, derived, images_of)
    data = {}
    for phase in info.phases:
        images_path, images = paths_of[phase], images_of[phase]
        if info.sparse:
            parts = [find_file(name, root, derived) for name in SparseLabels.files(phase)]
            labels = SparseLabels.load(parts[0].parent, phase, info.num_classes)
            if len(labels) != len(images):
                raise DataError(f"{images_path} lists {len(images)} images but its label files have {len(labels)} "
                                f"rows. {_formatted_fix(dataset, root, [images_path, *parts])}")  # fmt: skip
            data[phase] = {"images": images, "labels": labels, "labels_obs": labels}
            continue
        labels_path = find_file(f"formatted_{phase}_labels.npy", root, derived)
        fix = _formatted_fix(dataset, root, [images_path, labels_path])
        labels = load_npy(labels_path, fix)
        _check_labels(labels_path, labels, len(images), info.num_classes, (0, 1), fix)
        obs_name = regime.file(phase)
        observed = _existing_observed(find_file(obs_name, root, derived), labels)
        if observed is None:
            with data_lock(derived, f"The data folder {derived} (observed labels being written)"):
                observed = _existing_observed(derived / obs_name, labels)  # another process may have made it
                if observed is None:
                    observed = regime.observe(labels)
                    files.save_npy_atomic(derived / obs_name, observed)
        if phase == "train" and not observed.any():  # training would see all-unknown labels and learn nothing
            fix = ("give a larger --label_proportion" if regime.proportion is not None else
                   f"the file is damaged: delete {find_file(obs_name, root, derived)} to regenerate it")  # fmt: skip
            raise DataError(f"The regime '{regime.describe()}' observes no label at all among the {len(labels)} "
                            f"training images ({obs_name}): {fix}.")  # fmt: skip
        data[phase] = {"images": images, "labels": labels, "labels_obs": observed}
    return data


def _check_distinct_names(dataset: str, root: Path, derived: Path, images_of: dict[str, np.ndarray]) -> None:
    """Each image listed once in its split's formatted images file, and in one split only: a repeated image could
    land in both training and validation with conflicting labels, or be trained on and scored. DataError naming the
    file(s), an example and what to delete."""
    found = repeated_name(images_of)
    if found is None:
        return
    name, places = found
    info = DATASET_INFO[dataset]

    def phase_files(phase: str) -> list[Path]:
        labels = SparseLabels.files(phase) if info.sparse else [f"formatted_{phase}_labels.npy"]
        return [find_file(f, root, derived) for f in [f"formatted_{phase}_images.npy", *labels]]

    phases = list(dict.fromkeys(phase for phase, _ in places))
    fix = _formatted_fix(dataset, root, [path for phase in phases for path in phase_files(phase)])
    if len(phases) == 1:
        rows = [str(row) for _, row in places]
        listed = f"{', '.join(rows[:-1])} and {rows[-1]}" if len(rows) <= 5 else f"{', '.join(rows[:5])}, ..."
        raise DataError(f"{phase_files(phases[0])[0]} lists the image {name!r} {len(rows)} times (rows {listed}): "
                        "each image must be listed once (a repeated one could land in both training and validation, "
                        f"with conflicting labels). {fix}")  # fmt: skip
    (first, row_a), (second, row_b) = places[0], next(place for place in places if place[0] != places[0][0])
    raise DataError(f"{phase_files(second)[0]} lists the image {name!r} (row {row_b}), which {phase_files(first)[0]} "
                    f"lists too (row {row_a}): the {first} and {second} splits must not share an image (it would be "
                    f"trained on and scored). {fix}")  # fmt: skip


def repeated_name(names_of: Mapping[str, np.ndarray]) -> tuple[str, list[tuple[str, int]]] | None:
    """A name that the arrays of ``names_of`` (phase -> 1-D str or bytes names) list more than once, within one or
    across several, with its places ``[(phase, row), ...]`` in order; None when every name is distinct. Arrays that
    are each strictly increasing with disjoint ranges (as the formatter writes OpenImages' 3.4M names) take one
    comparison pass; others one ``np.unique``."""
    phases = list(names_of)
    arrays = [np.asarray(names_of[phase]) for phase in phases]
    if len({a.dtype.kind for a in arrays}) > 1:  # str and bytes mixed: compare as str
        arrays = [a if a.dtype.kind == "U" else np.char.decode(a, "utf-8", "replace") for a in arrays]
    if all(len(a) < 2 or bool((a[1:] > a[:-1]).all()) for a in arrays):
        bounds = sorted((a[0], a[-1]) for a in arrays if len(a))
        if all(high < low for (_, high), (low, _) in zip(bounds, bounds[1:], strict=False)):
            return None
    names = np.concatenate(arrays)
    values, first, inverse, counts = np.unique(names, return_index=True, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    if not len(repeated):
        return None
    pick = repeated[np.argmin(first[repeated])]  # the repeated name that comes first
    rows = np.flatnonzero(inverse.ravel() == pick)
    starts = np.cumsum([0] + [len(a) for a in arrays])
    where = np.searchsorted(starts, rows, side="right") - 1
    name = values[pick]
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return name, [(phases[w], int(r - starts[w])) for w, r in zip(where, rows, strict=True)]


def _existing_observed(path: Path, labels: np.ndarray) -> np.ndarray | None:
    if not path.exists():
        return None
    observed = load_npy(path, f"Delete {path} to regenerate it.")
    check_observed(path, observed, labels)
    return observed


# ---------------------------------------------------------------------------------------------------------------------
# Where derived files go, and the lock that keeps two processes from writing them at once.

LOCK_NAME = ".largeloss.lock"
LOCK_WAIT_S = 3600.0  # how long a process waits for another that is writing the same derived files
_noted_read_only: set[str] = set()


def user_cache_home() -> Path:
    """The per-user cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``; without a home directory, as for a container's
    user without HOME and without a passwd entry, ``<temp dir>/largeloss-cache-<uid>``)."""
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"])
    try:
        return Path.home() / ".cache"
    except (RuntimeError, KeyError):  # Path.home() raises when neither HOME nor the passwd entry names a home
        return no_home_cache()


def no_home_cache() -> Path:
    """The cache folder of a user without a home directory: in the system's temporary folder, one per user."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"largeloss-cache-{user}"


def derived_dir(cfg) -> Path:
    """Where the files the tool derives from a dataset go (observed labels, formatted files it makes, ``--cache disk``
    pixels, LinearInit features): see ``derived_folder``. Reads ``cfg.dataset``, ``cfg.data_root`` and
    ``cfg.cache_dir`` (None when absent)."""
    return derived_folder(cfg.dataset, cfg.data_root, getattr(cfg, "cache_dir", None))


def derived_folder(dataset: str, data_root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/<dataset>-<hash>`` when ``cache_dir`` is given; else the data root itself; else, when the data
    root is not writable (read-only shared storage), ``<user cache>/largeloss/<dataset>-<hash>`` with a one-line note.
    ``<hash>``: the first 12 hex digits of the SHA-1 of the resolved data root, so one cache folder serves any number
    of datasets and data roots without their files mixing."""
    root = Path(data_root)
    key = f"{dataset}-{hashlib.sha1(os.fsencode(os.path.realpath(root))).hexdigest()[:12]}"  # any name's bytes
    if cache_dir is not None:
        return Path(cache_dir) / key
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK):
        return root
    folder = user_cache_home() / "largeloss" / key
    if str(root) not in _noted_read_only:
        _noted_read_only.add(str(root))
        temporary = (
            " (this user has no home directory: a temporary folder)" if no_home_cache() in folder.parents else ""
        )
        print(f"note: the data root {root} is not writable: the files derived from it go to {folder}{temporary} "
              "(--cache_dir chooses another folder)")  # fmt: skip
    return folder


@contextlib.contextmanager
def data_lock(folder: Path, what: str, lock_file: Path | None = None, wait_s: float | None = None) -> Iterator[None]:
    """Hold ``folder/.largeloss.lock`` (or ``lock_file``) for the block, so two processes never write the same derived
    files at once. While another process holds it, wait (saying so once) up to ``wait_s`` (``LOCK_WAIT_S``), then
    raise ``files.LockError``. A lock left by a killed process is free (see ``files.acquire_lock``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_file if lock_file is not None else folder / LOCK_NAME
    wait = LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            held = files.acquire_lock(path, what)
            break
        except files.LockError as err:
            if not said and wait > 0:
                print(f"{err} Waiting for it (up to {wait:.0f} s) ...", flush=True)
                said = True
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    try:
        yield
    finally:
        held.release()


@dataclass(frozen=True)
class Split:
    """One split: image names (relative to ``image_dir``), full labels and observed labels, rows aligned.

    Dense datasets: ``labels`` float32 0/1, ``observed`` int8 -1/0/1. OpenImages: both ``SparseLabels`` (-1/+1 where
    annotated, and the same object: its partial labels are what is observed and what is scored).
    """

    image_dir: str
    image_names: np.ndarray
    labels: np.ndarray | SparseLabels
    observed: np.ndarray | SparseLabels
    offset: int = 0  # a share of a split: its first row's place in the whole split (whose disk cache it reads)
    whole_size: int | None = None

    def __len__(self) -> int:
        return len(self.image_names)

    def image_path(self, i: int) -> str:
        name = self.image_names[i]
        return os.path.join(self.image_dir, name.decode() if isinstance(name, bytes) else str(name))

    def share(self, rank: int, world: int) -> Split:
        """The contiguous ``rank``-th of ``world`` shares of the images (for scoring each image exactly once across
        processes: the shares, in rank order, are the split). Labels stay with the whole split."""
        if world == 1:
            return self
        rows = np.array_split(np.arange(len(self)), world)[rank]
        first = int(rows[0]) if len(rows) else 0
        return Split(self.image_dir, self.image_names[rows], None, None, offset=first, whole_size=len(self))


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_groups: np.ndarray | None = None  # OpenImages: group 0..4 of each class (G1 = 0, the rarest)


def class_groups(positives_per_class: np.ndarray, num_groups: int = NUM_GROUPS) -> np.ndarray:
    """Classes in ``num_groups`` equal groups by number of positives, group 0 the rarest (ties by class index)."""
    order = np.argsort(positives_per_class, kind="stable")
    groups = np.empty(len(order), dtype=np.int64)
    for g, members in enumerate(np.array_split(order, num_groups)):
        groups[members] = g
    return groups


def build_data(cfg) -> Data:
    """train / val / test for the configured dataset.

    Dense datasets: train and val are the official 80/20 split of the official train split (optionally subsampled),
    test is the official validation split; val and test are scored on full labels. OpenImages: its own train,
    validation and test splits (train and val subsampled the same way), scored on their annotated entries only.
    The observed training labels follow the regime of ``cfg`` (``regime_of``); files the tool derives go to
    ``derived_dir(cfg)``.
    """
    root = Path(cfg.data_root)
    info = DATASET_INFO[cfg.dataset]
    regime = regime_of(cfg)
    if info.prepare is not None:
        info.prepare(root)
    data = load_formatted(cfg.dataset, root, derived_dir(cfg), regime)
    if info.sparse:
        train_idx, val_idx = np.arange(len(data["train"]["images"])), np.arange(len(data["val"]["images"]))
        sources = {"train": "train", "val": "val", "test": "test"}
    else:
        train_idx, val_idx = split_indices(len(data["train"]["images"]), cfg.val_frac, cfg.split_seed)
        sources = {"train": "train", "val": "train", "test": "val"}
    train_idx, val_idx = subsample_indices(train_idx, val_idx, cfg.ss_frac_train, cfg.ss_frac_val, cfg.ss_seed)
    image_dir = str(root / info.image_dir)

    def make(phase: str, idx: np.ndarray | None) -> Split:
        d = data[sources[phase]]
        idx = np.arange(len(d["images"])) if idx is None else idx
        if info.sparse:
            labels = d["labels"].rows(idx)
            return Split(image_dir, d["images"][idx], labels, labels)
        return Split(
            image_dir, d["images"][idx], d["labels"][idx].astype(np.float32), d["labels_obs"][idx].astype(np.int8)
        )

    splits = {"train": make("train", train_idx), "val": make("val", val_idx), "test": make("test", None)}
    if cfg.train_set_variant == "clean":
        train = splits["train"]
        splits["train"] = Split(
            train.image_dir, train.image_names, train.labels, np.where(train.labels > 0, 1, -1).astype(np.int8)
        )
    elif regime != Regime():
        print(f"observed labels: {regime.describe()} ({regime.file('train')}); the paper used single positive only")
    _report_rows_without_positives(splits)
    _report_classes_without_positives(splits, lambda: class_names(cfg.dataset, root))
    check_images_exist(splits)
    groups = class_groups(data["train"]["labels"].positives_per_class()) if info.sparse else None
    return Data(**splits, num_classes=info.num_classes, class_groups=groups)


def _report_rows_without_positives(splits: dict[str, Split]) -> None:
    counts = {}
    for phase, split in splits.items():
        if isinstance(split.labels, SparseLabels):
            rows_with = np.unique(split.labels.entries()[0][split.labels.values > 0])
            counts[phase] = len(split) - len(rows_with)
        else:
            counts[phase] = int((split.labels.max(axis=1) <= 0).sum()) if len(split) else 0
    if any(counts.values()):
        listed = ", ".join(f"{phase} {n} of {len(splits[phase])}" for phase, n in counts.items())
        print(f"images without any positive label (kept, as the official tools keep them): {listed}")


def classes_without_positives(labels: np.ndarray | SparseLabels) -> np.ndarray:
    """The classes that enter a split's mAP with AP 0: no positive image (OpenImages: annotated entries but none
    positive; a class with no annotated entry at all is left out of its mAP, so it is not listed)."""
    if isinstance(labels, SparseLabels):
        annotated = np.bincount(labels.indices.astype(np.int64), minlength=labels.num_classes) > 0
        return np.flatnonzero(annotated & (labels.positives_per_class() == 0))
    return np.flatnonzero((np.asarray(labels) > 0).sum(axis=0) == 0)


def _report_classes_without_positives(splits: dict[str, Split], class_names_of: Callable[[], list[str]]) -> None:
    """One note per run: how many (and which, up to 5) classes have no positive in val and in test. The names are
    read (``class_names_of()``) only when there is something to say: COCO's come from a large JSON file."""
    parts, names = [], None
    for phase in ("val", "test"):
        empty = classes_without_positives(splits[phase].labels)
        if len(empty):
            names = class_names_of() if names is None else names
            shown = ", ".join(names[c] for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
            parts.append(f"{phase} {len(empty)} of {len(names)} ({shown})")
    if parts:
        print(f"note: classes without any positive image: {'; '.join(parts)}. Each enters that split's mAP with AP 0: "
              "the official evaluation keeps every class in the mean, and so does this one.")  # fmt: skip


def check_images_exist(splits: dict[str, Split]) -> None:
    """Every listed image must exist and be non-empty before training starts; say how many are not, and which."""
    total = sum(len(s) for s in splits.values())
    shown: list[str] = []
    missing = empty = 0
    with tqdm(total=total, desc="checking images", disable=total < 200_000, leave=False) as bar:
        for split in splits.values():
            for i in range(len(split)):
                path = split.image_path(i)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = None
                if size is None or size == 0:
                    missing += size is None
                    empty += size == 0
                    if len(shown) < 5:
                        shown.append(path if size is None else f"{path} (zero bytes)")
            bar.update(len(split))
    if missing or empty:
        what = " and ".join(
            part for part in (f"{missing} of {total} listed images are missing" if missing else "",
                              f"{empty} of {total} are empty files (zero bytes)" if empty else "") if part
        )  # fmt: skip
        listed = "\n  ".join(shown)
        raise DataError(
            f"{what}, for example:\n  {listed}\nCheck --data_root and that the image archives are fully downloaded "
            "and extracted (data/README.md)."
        )


def check_images_decode(splits: dict[str, Split], per_split: int = 16) -> None:
    """Decode a sample of each split's images (``per_split``, evenly spread, first and last included); say which
    fail. A cheap check that the images are real, for ``python datasets.py``; training decodes every one anyway."""
    bad, tried = [], 0
    for split in splits.values():
        rows = np.unique(np.linspace(0, len(split) - 1, min(per_split, len(split))).round().astype(int))
        for row in rows:
            tried += 1
            try:
                load_image(split.image_path(int(row)), 8)
            except DataError as err:
                bad.append(str(err))
    if bad:
        listed = "\n  ".join(bad[:5])
        raise DataError(f"{len(bad)} of {tried} sampled images cannot be decoded:\n  {listed}\nReplace them: "
                        "download and extract the image archives again (data/README.md).")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Images.


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit grayscale (PIL modes ``I;16*``, and ``I``, which older Pillow gives 16-bit PNGs) is
    scaled to 8 bits (v / 257, rounded), never clipped as ``convert("RGB")`` would (it maps nearly every pixel to
    255); every other mode (L, P, LA, RGBA, CMYK, 1, ...) goes through ``convert("RGB")``, as the paper's loader.
    An RGB image is returned as it is (``convert`` would only copy it)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def load_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 H x W x 3, resized to size x size with PIL bilinear: the paper's ``Resize((size, size))`` before
    ``ToTensor``, pixel for pixel (``to_rgb`` first)."""
    return _decoded(path, lambda image: np.array(image.resize((size, size), Image.BILINEAR)))


def decode_image(path: str) -> np.ndarray:
    """RGB uint8 H x W x 3 at the image's own size (``to_rgb``): ``load_image`` without the resize, which
    ``--eval_resize device`` does on the device (``resize.py``)."""
    return _decoded(path, np.array)


def decode_for_device(path: str, size: int, pass_order: str) -> resize.Decoded:
    """``decode_image`` as a ``resize.Decoded``, to be resized to ``size`` x ``size`` on the device in the pass order
    that ``pass_order`` (a key of ``resize.PASS_ORDERS``) gives the image's size."""
    pixels = decode_image(path)
    height, width = pixels.shape[:2]
    return resize.Decoded(pixels, size, resize.PASS_ORDERS[pass_order](width, height, size, size))


def loader_item(path: str, size: int, pass_order: str | None = None) -> torch.Tensor | resize.Decoded:
    """One image as a loader's item: uint8 C x H x W resized by PIL (``load_image``), or, with ``pass_order``
    (``--eval_resize device``), only decoded, for the device to resize (``decode_for_device``)."""
    if pass_order is not None:
        return decode_for_device(path, size, pass_order)
    return pixels_to_tensor(load_image(path, size))


def _decoded(path: str, pixels: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    try:
        with Image.open(path) as raw:
            return pixels(to_rgb(raw))
    except Image.DecompressionBombError as err:  # not an OSError: PIL refuses to decode that many pixels
        raise DataError(f"Cannot decode image {path}: it is too large to decode safely ({err}). Replace or remove the "
                        "file.") from None  # fmt: skip
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot decode image {path}: {err}. Replace or remove the file.") from None


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 pixels as a C x H x W tensor that views them: channels-last strides, the layout the model runs
    in (``to_model_input``), so no image is ever transposed on the host."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """C x H x W images (``pixels_to_tensor``) -> one N x C x H x W batch with channels-last strides: a straight copy
    of each image's pixels, into shared memory when in a DataLoader worker (``default_collate``). Any other layout
    gives the same values, only transposed on the way."""
    return torch.utils.data.default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def collate_images(items: list[tuple]) -> tuple[torch.Tensor | resize.DecodedBatch, torch.Tensor]:
    """``ImageDataset`` items -> (uint8 batch, as ``stack_images``, or the decoded images of ``--eval_resize device``
    as a ``resize.DecodedBatch``; int64 row indices)."""
    images, indices = zip(*items, strict=True)
    if isinstance(images[0], resize.Decoded):
        return resize.DecodedBatch.collate(list(images)), torch.tensor(indices)
    return stack_images(list(images)), torch.tensor(indices)


SIDE_STREAM_COPIES = True  # bench/gpu_check.py turns it off to measure what the side stream gives


def batch_to_device(images: torch.Tensor | resize.DecodedBatch, device: torch.device) -> torch.Tensor:
    """A loader batch as uint8 N x 3 x H x W on ``device``, copied without waiting (pinned memory); a
    ``resize.DecodedBatch`` is resized there, to the pixels the workers would have made.

    On a CUDA device the copy runs on a side stream: on the current stream it would wait for every kernel queued
    before it (the previous step's) and hold back every kernel after it, so the GPU would idle while the batch
    crosses the bus. The current stream waits for the copy only (an event on the device, not on the host), and the
    copy's memory is kept from reuse until that stream is done with it (``record_stream``). Same values."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the stream is cached per device: name the current one
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _copy_stream(device) if SIDE_STREAM_COPIES else None
    if stream is None:
        images = images.to(device, non_blocking=True)
    else:
        current = torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            images = images.to(device, non_blocking=True)
        current.wait_stream(stream)
        images.record_stream(current)
    return images.resize() if isinstance(images, resize.DecodedBatch) else images


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The side stream for host-to-device copies of ``device`` (``cuda:N``; None off CUDA: the copy is already the
    next thing)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def check_device_resize(
    paths: list[str], image_size: int, device: torch.device, pass_order: str, count: int = 8
) -> int:
    """``--eval_resize device`` against PIL on the data itself, once per run: up to ``count`` of ``paths`` of distinct
    sizes (from the files' headers) resized on ``device`` and by PIL, every pixel compared (one read-back from the
    device). ``resize.ResizeUnavailable`` naming the first image that differs; returns how many were compared. The
    start check (``resize.pass_order``) used probe images; this one uses the run's own sizes."""
    chosen, items, sizes = [], [], set()
    for path in paths:
        try:
            with Image.open(path) as image:
                size = image.size
            if size in sizes:
                continue
            items.append(decode_for_device(path, image_size, pass_order))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, DataError):
            continue  # an unreadable file (or one too large to decode) is reported or skipped where images are loaded
        sizes.add(size)
        chosen.append(path)
        if len(chosen) == count:
            break
    if not chosen:
        return 0
    resized = batch_to_device(resize.DecodedBatch.collate(items), device).cpu()
    for image, path in zip(resized, chosen, strict=True):
        if not torch.equal(image, loader_item(path, image_size)):
            raise resize.ResizeUnavailable(
                f"--eval_resize device: the device resize gives other pixels than PIL for {path} (checked at start on "
                f"{len(chosen)} images of distinct sizes), so it would not give the paper's pixels. Use --eval_resize "
                "workers (the default)."
            )
    return len(chosen)


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 image C x H x W, row index)`` (``pixels_to_tensor``; batched by ``collate_images``); labels
    stay with the trainer, which owns them.

    Decodes and resizes each image with PIL (in the DataLoader's workers), or, with ``cache``, reads the already
    resized pixels from a disk cache (``build_disk_cache``): the same bytes either way. With ``pass_order`` (a key of
    ``resize.PASS_ORDERS``: the installed Pillow's, ``resize.pass_order()``) it only decodes, and the item is a
    ``resize.Decoded`` that the device resizes to the same bytes (``--eval_resize device``).
    """

    def __init__(self, split: Split, image_size: int, cache: Path | None = None, pass_order: str | None = None) -> None:
        self.split = split
        self.image_size = image_size
        self.cache = cache
        self.pass_order = pass_order
        self._pixels: np.ndarray | None = None  # the cache's memory map, opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | resize.Decoded, int]:
        row = index if index >= 0 else -1 - index  # -1 - row: a padding copy of ``row`` (distributed.share)
        if self.cache is None:
            return loader_item(self.split.image_path(row), self.image_size, self.pass_order), index
        if self._pixels is None:
            size = self.split.whole_size or len(self.split)
            self._pixels = _open_cache(self.cache, size, self.image_size, "r")
        return pixels_to_tensor(np.array(self._pixels[self.split.offset + row])), index

    def __getstate__(self) -> dict:  # never pickle an open memory map into a worker
        return {**self.__dict__, "_pixels": None}


# ---------------------------------------------------------------------------------------------------------------------
# The disk cache (--cache disk): every image decoded and resized once, stored as uint8, memory-mapped.

_CACHE_CHUNK = 256


def split_fingerprint(split: Split) -> str:
    """A short hash of a split's image list: names the files cached per split (pixels, LinearInit's features)."""
    return hashlib.sha1(b"\n".join(str(n).encode() for n in split.image_names)).hexdigest()[:12]


def disk_cache_path(split: Split, image_size: int, root: str | os.PathLike) -> Path:
    return Path(root) / "cache" / f"{split_fingerprint(split)}_{image_size}px.u8"


def _open_cache(path: Path, num_images: int, image_size: int, mode: str) -> np.ndarray:
    """The cache's pixels, memory-mapped; an existing cache file (mode ``r``/``r+``) of another size than its images
    take (cut short, or changed after it was built) is a DataError that says to delete it."""
    if mode != "w+" and path.exists() and not _cache_size_ok(path, num_images, image_size):
        need = _cache_bytes(num_images, image_size)
        raise DataError(
            f"The disk cache {path} holds {path.stat().st_size} bytes, not the {num_images} x {image_size} x "
            f"{image_size} x 3 = {need} its images take: it was cut short or changed after it was built. Delete {path} "
            "and run again: the next run builds it anew."
        )
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(num_images, image_size, image_size, 3))


def _cache_bytes(num_images: int, image_size: int) -> int:
    """The size of a cache file: ``num_images`` x S x S x 3 bytes (S: ``image_size``)."""
    return num_images * image_size * image_size * 3


def _cache_size_ok(path: Path, num_images: int, image_size: int) -> bool:
    """Whether the cache file holds exactly ``_cache_bytes`` bytes."""
    try:
        return path.stat().st_size == _cache_bytes(num_images, image_size)
    except OSError:
        return False


def _cache_done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done.npy")


def disk_cache_complete(path: Path, num_images: int, image_size: int) -> bool:
    """The cache file is there, of the size its images take (``_cache_size_ok``), and every image is marked done: a
    file cut short behind an intact bitmap is not complete."""
    done = _cache_done(path, num_images)
    return done is not None and bool(done.all()) and _cache_size_ok(path, num_images, image_size)


def _cache_done(path: Path, num_images: int) -> np.ndarray | None:
    """The cache's bitmap of finished images; None when absent, unreadable or of another size (start over)."""
    done_path = _cache_done_path(path)
    try:
        done = np.load(done_path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return done if done.shape == (num_images,) and done.dtype == bool else None


_worker_cache: dict = {}


def _cache_worker_init(path: Path, split: Split, image_size: int) -> None:
    _worker_cache.update(pixels=_open_cache(path, len(split), image_size, "r+"), split=split, size=image_size)


def _cache_fill(indices: np.ndarray) -> np.ndarray:
    pixels, split, size = _worker_cache["pixels"], _worker_cache["split"], _worker_cache["size"]
    for i in indices:
        pixels[i] = load_image(split.image_path(int(i)), size)
    pixels.flush()
    return indices


def build_disk_cache(split: Split, image_size: int, path: Path, num_workers: int, on_chunk=None) -> Path:
    """Decode and resize every image of ``split`` once into ``path`` (N x S x S x 3 uint8, memory-mapped), in
    ``num_workers`` processes, with a progress bar. Resumable: a bitmap of finished images is saved after every chunk,
    so an interrupted build continues where it stopped. Announces the size first and refuses when the disk is short.
    ``on_chunk(done_count)`` is called after each chunk (tests use it to interrupt a build)."""
    n = len(split)
    if disk_cache_complete(path, n, image_size):
        return path
    lock = path.with_name(path.name + ".lock")
    with data_lock(path.parent, f"The disk cache {path} (being built)", lock_file=lock):
        return _build_disk_cache(split, image_size, path, num_workers, on_chunk)


def _build_disk_cache(split: Split, image_size: int, path: Path, num_workers: int, on_chunk) -> Path:
    n = len(split)
    if disk_cache_complete(path, n, image_size):  # built by the process that held the lock before
        return path
    need = _cache_bytes(n, image_size)
    done_path = _cache_done_path(path)
    # A cache file that is missing or of another size (cut short) starts over, whatever its bitmap says.
    fresh = not _cache_size_ok(path, n, image_size)
    if fresh and path.exists():
        print(f"disk cache: {path} holds {path.stat().st_size} bytes, not the {need} its images take (cut short?): "
              "building it anew")  # fmt: skip
    done = None if fresh else _cache_done(path, n)
    done = np.zeros(n, dtype=bool) if done is None else done
    free = shutil.disk_usage(path.parent).free + (path.stat().st_size if path.exists() else 0)
    print(f"disk cache: {n} images x {image_size}x{image_size}x3 = {need / 1e9:.2f} GB in {path} "
          f"({int(done.sum())} already done; {free / 1e9:.1f} GB free)")  # fmt: skip
    if need > free - 2**30:
        raise DataError(f"The disk cache needs {need / 1e9:.2f} GB in {path.parent}, but only {free / 1e9:.2f} GB are "
                        "free (keeping 1 GB spare). Free some space, or train without --cache disk.")  # fmt: skip
    if fresh:
        done_path.unlink(missing_ok=True)  # never a stale bitmap beside a new, empty file
        _open_cache(path, n, image_size, "w+").flush()
    todo = np.flatnonzero(~done)
    chunks = [todo[i : i + _CACHE_CHUNK] for i in range(0, len(todo), _CACHE_CHUNK)]
    pool = None
    if num_workers > 0:
        pool = multiprocessing.get_context("fork").Pool(num_workers, _cache_worker_init, (path, split, image_size))
        finished = pool.imap_unordered(_cache_fill, chunks)
    else:
        _cache_worker_init(path, split, image_size)
        finished = map(_cache_fill, chunks)
    try:
        with tqdm(total=n, initial=int(done.sum()), desc="disk cache", unit="img") as bar:
            for indices in finished:
                done[indices] = True
                files.save_npy_atomic(done_path, done)
                bar.update(len(indices))
                if on_chunk is not None:
                    on_chunk(int(done.sum()))
    finally:
        if pool is not None:
            pool.terminate()
        files.save_npy_atomic(done_path, done)
    return path


def to_model_input(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalised float: ``RandomHorizontalFlip`` (where ``flip``), ``ToTensor``, ``Normalize``.
    Same arithmetic as torchvision's transforms, run on whatever device the batch is on; channels-last layout, which
    the convolutions run fastest on (CPU and GPU alike), and in which the loader's batches already arrive."""
    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    x = images.float().div(255)
    mean, std = _normalisation(x.device)
    return x.sub(mean).div(std).contiguous(memory_format=torch.channels_last)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as 1 x 3 x 1 x 1 tensors on ``device``, made once per device (a host-to-device copy
    per batch would make the host wait for the GPU)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return mean.to(device), std.to(device)


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 16 + stream)


class EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch, a pure function of (seed, epoch): a seeded permutation (or the natural order) cut
    into batches of ``batch_size``, the last one smaller (``drop_last=False`` as the paper). Also draws each image's
    horizontal flip for the epoch, so batch order and augmentation never depend on workers or processes.

    Under torchrun (``world > 1``) the batches are the same global batches and each process yields its contiguous
    share of each (``distributed.share``); ``global_sizes`` are the global batches' sizes.
    """

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.flips = torch.rand(self.num_items, generator=_epoch_generator(self.seed, epoch, 1)) < 0.5
        self.global_sizes = [len(batch) for batch in self._global_batches()]

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=_epoch_generator(self.seed, self.epoch, 0))
        else:
            order = torch.arange(self.num_items)
        return list(order.split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.num_items // self.batch_size)

    def __iter__(self):
        for batch in self._global_batches():
            yield batch.tolist() if self.world == 1 else distributed.share(batch.numpy(), self.rank, self.world)


# Evaluation has no gradients and BatchNorm in eval mode: the model scores batches of EVAL_BATCH_FACTOR x bsize
# images (same scores, fewer launches); the loader still delivers batches of bsize, joined on the device
# (``train.predict``), so that the workers' first batches arrive as soon as during training.
EVAL_BATCH_FACTOR = 4


def make_loaders(
    parts: dict[str, tuple[Split, bool, Path | None]], cfg, *, pin_memory: bool, ctx=None, eval_resize: str = "workers"
) -> dict:
    """Batches of ``(uint8 images, row indices)`` of each split in ``parts`` (name -> (split, train, disk cache or
    None)), in ``EpochBatches`` order, all from one pool of ``cfg.num_workers`` worker processes: pinned memory for the
    copy to the GPU, workers kept for the whole run and several batches prefetched. One pool, not one per split: no
    split waits for its own workers to start (the test split's would start only for the final test), and a CUDA graph
    captured after the first training batch never sees a worker forked after it (``trainstep.py``). Training batches
    are shares of the global batches under torchrun (``ctx``).

    With ``eval_resize="device"`` the workers of the splits that are not trained on (and have no disk cache) only
    decode: their batches are ``resize.DecodedBatch``es (``batch_to_device``). ``resize.ResizeUnavailable`` if the
    installed Pillow resizes differently from ``resize.py``.

    Returns name -> ``SplitLoader``, iterated like a DataLoader; iterate one at a time (each new iteration ends the
    previous one)."""
    samplers, items = [], []
    for split, train, cache in parts.values():
        rank, world = (ctx.rank, ctx.world) if (train and ctx is not None) else (0, 1)
        samplers.append(EpochBatches(len(split), cfg.bsize, shuffle=train, seed=cfg.seed, rank=rank, world=world))
        order = resize.checked_pass_order() if eval_resize == "device" and not train and cache is None else None
        items.append(ImageDataset(split, cfg.image_size, cache, order))
    workers = cfg.num_workers
    pool = torch.utils.data.DataLoader(
        _PoolItems(items),
        batch_sampler=_PoolBatches(samplers),
        collate_fn=collate_images,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return {name: SplitLoader(pool, part) for part, name in enumerate(parts)}


def make_loader(
    split: Split, cfg, *, train: bool, pin_memory: bool, cache: Path | None = None, ctx=None, eval_resize="workers"
):
    """One split's loader (``make_loaders`` with one part)."""
    parts = {"split": (split, train, cache)}
    return make_loaders(parts, cfg, pin_memory=pin_memory, ctx=ctx, eval_resize=eval_resize)["split"]


class SplitLoader:
    """One split's batches from a shared DataLoader (``make_loaders``): ``len``, iteration and ``batch_sampler`` (the
    split's ``EpochBatches``) as a DataLoader's."""

    def __init__(self, pool: torch.utils.data.DataLoader, part: int) -> None:
        self.pool, self.part = pool, part
        self.batch_sampler: EpochBatches = pool.batch_sampler.samplers[part]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        self.pool.batch_sampler.part = self.part  # read when the pool's iteration starts, below
        return iter(self.pool)


class _PoolItems(torch.utils.data.Dataset):
    """Several splits' ``ImageDataset``s behind one set of workers: item ``(part, index)`` is ``parts[part][index]``."""

    def __init__(self, parts: list[ImageDataset]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        part, index = key
        return self.parts[part][index]


class _PoolBatches(torch.utils.data.Sampler):
    """The batches of the part being iterated (``part``), as ``(part, index)`` keys."""

    def __init__(self, samplers: list[EpochBatches]) -> None:
        self.samplers, self.part = samplers, 0

    def __len__(self) -> int:
        return len(self.samplers[self.part])

    def __iter__(self):
        part = self.part
        for batch in self.samplers[part]:
            yield [(part, index) for index in batch]


# ---------------------------------------------------------------------------------------------------------------------
# Class names (for figures; the formatted files carry none).


def class_names(dataset: str, root: str | os.PathLike) -> list[str]:
    """The classes' names in column order, from the raw files when they are there, else ``class <i>``."""
    info = DATASET_INFO[dataset]
    names = info.read_class_names(Path(root)) if info.read_class_names is not None else []
    return names if len(names) == info.num_classes else [f"class {i}" for i in range(info.num_classes)]


# ---------------------------------------------------------------------------------------------------------------------
# ``python datasets.py <name>``: prepare a dataset without training.


def prepare(dataset: str, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> None:
    """Format the raw annotations, generate the observed labels, check that every image is there and that a sample
    decodes, and print a summary."""
    root = Path(root) if root else Path(__file__).resolve().parent / "data" / dataset
    info = DATASET_INFO[dataset]
    if info.prepare is not None:
        info.prepare(root)
    data = load_formatted(dataset, root, derived_folder(dataset, root, cache_dir))
    image_dir = str(root / info.image_dir)
    splits = {phase: Split(image_dir, d["images"], d["labels"], d["labels_obs"]) for phase, d in data.items()}
    _report_rows_without_positives(splits)
    check_images_exist(splits)
    check_images_decode(splits)
    sizes = ", ".join(f"{phase} {len(split)}" for phase, split in splits.items())
    print(f"{dataset} is ready in {root}: {sizes} images, {info.num_classes} classes.")


CLI_INTERRUPTED = "interrupted; every file written so far is complete: run the same command again."


def cli(argv: list[str] | None = None) -> int:
    """``python datasets.py <name> [--data_root DIR] [--cache_dir DIR]``: exit 0 when ready, 1 with a message."""
    import argparse

    parser = argparse.ArgumentParser(description=prepare.__doc__)
    parser.add_argument("dataset", choices=sorted(DATASET_INFO))
    parser.add_argument("--data_root", default=None, help="default: data/<dataset> in the repository")
    parser.add_argument("--cache_dir", default=None, help="where derived files go (default: the data root)")
    args = parser.parse_args(argv)
    try:
        prepare(args.dataset, args.data_root, args.cache_dir)
    except (DataError, files.LockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        tool_io.reraise_if_output_closed(err)  # `python datasets.py D | head`: ends quietly (tool_io.run)
        print(f"error: cannot use {err.filename or args.data_root}: {err.strerror or err}. Check --data_root and "
              "--cache_dir.", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print(f"error: {CLI_INTERRUPTED}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Run as a script, this file is the module ``__main__``: go through the module ``datasets`` that the rest of the
    # tool imports (one registry, one DataError), with the synthetic generator registered (synthetic imports datasets,
    # never the other way round).
    import datasets
    import synthetic  # noqa: F401

    tool_io.run(datasets.cli, interrupted=datasets.CLI_INTERRUPTED)
