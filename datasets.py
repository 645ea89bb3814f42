"""Raw official annotations -> formatted files -> observed (single positive) labels -> splits -> image loaders.

The rules that decide the numbers follow the official tools exactly (PAPER_FACTS section 3): each dataset's rows,
row order, columns and file names; the observed-label generator; the 80/20 split of the official train split and the
optional subsampling. They are pure functions of the annotations or of a label matrix, tested without any image.
Images are decoded and resized with PIL exactly as the paper's transforms do; the loader hands uint8 batches to the
trainer, which flips and normalises them on the device (``to_model_input``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoint
import distributed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OBSERVED_SEED = 1200  # the official generator's seed, fresh for each split file
NUM_GROUPS = 5  # OpenImages: classes in five groups by number of annotated training positives


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_dir: str  # what the names in formatted_*_images.npy are relative to, inside the data root
    # The formatted phases: the official train split and the official validation split (our test set). OpenImages
    # keeps its own validation split for model selection, so it has three.
    phases: tuple[str, ...] = ("train", "val")
    sparse: bool = False  # labels stored as CSR: OpenImages' 3.4M x 5,000 matrix would take 17 GB dense


DATASET_INFO = {
    "synthetic": DatasetInfo(16, "images"),
    "pascal": DatasetInfo(20, "VOCdevkit/VOC2012/JPEGImages"),
    "coco": DatasetInfo(80, ""),
    "nuswide": DatasetInfo(81, "Flickr"),
    "cub": DatasetInfo(312, "CUB_200_2011/images"),
    "openimages": DatasetInfo(5000, "", ("train", "val", "test"), sparse=True),
}
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class DataError(Exception):
    """A problem with the user's data that the user can fix; the message says what and how."""


# ---------------------------------------------------------------------------------------------------------------------
# The official rules (pure functions).


def observe_labels(
    label_matrix: np.ndarray, num_pos: int = 1, num_neg: int = 0, seed: int = OBSERVED_SEED
) -> np.ndarray:
    """The official single-positive generator, element for element.

    0 is mapped to -1; one ``RandomState(seed)`` serves every row in order: shuffle the row's positive indices and keep
    the first ``num_pos`` as +1, then shuffle its negative indices (always, even when ``num_neg`` is 0, because that
    consumes random state) and keep the first ``num_neg`` as -1. Everything else is 0 (unobserved). The output keeps
    the input's dtype, like the official files.
    """
    if num_pos < 0 or num_neg < 0:
        raise ValueError("num_pos and num_neg must be >= 0")
    signed = np.where(label_matrix > 0, 1, -1).astype(label_matrix.dtype)
    observed = np.zeros_like(signed)
    rng = np.random.RandomState(seed)
    for i in range(signed.shape[0]):
        for value, count in ((1, num_pos), (-1, num_neg)):
            idx = np.nonzero(signed[i] == value)[0]
            rng.shuffle(idx)
            observed[i, idx[:count]] = value
    return observed


def split_indices(num_images: int, val_frac: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The official train/val split of the official train split: sorted index arrays (train, val)."""
    n_val = int(np.round(val_frac * num_images))
    if not 0 < n_val < num_images:
        raise DataError(f"--val_frac {val_frac} leaves an empty train or val split of {num_images} images")
    perm = np.random.RandomState(split_seed).permutation(num_images)
    return np.sort(perm[: num_images - n_val]), np.sort(perm[-n_val:])


def subsample_indices(
    train_idx: np.ndarray, val_idx: np.ndarray, frac_train: float, frac_val: float, ss_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The official optional subsampling: one RandomState for train then val, applied even when a fraction is 1."""
    rng = np.random.RandomState(ss_seed)
    out = []
    for idx, frac in ((train_idx, frac_train), (val_idx, frac_val)):
        keep = int(np.round(frac * len(idx)))
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
            checkpoint.save_npy_atomic(root / name, getattr(self, part))

    @classmethod
    def load(cls, root: Path, phase: str, num_classes: int) -> SparseLabels:
        parts = [np.load(root / name, allow_pickle=False) for name in cls.files(phase)]
        labels = cls(*parts, num_classes)
        indptr, indices, values = parts
        ok = (
            indptr.ndim == 1 and indptr[0] == 0 and len(indices) == len(values) == indptr[-1]
            and (np.diff(indptr) >= 0).all() and np.isin(values, (-1, 1)).all()
            and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < num_classes))
        )  # fmt: skip
        if not ok:
            raise DataError(f"The sparse label files formatted_{phase}_labels_*.npy in {root} are inconsistent. "
                            "Delete them and format again (data/openimages/README.md).")  # fmt: skip
        return labels


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
            for line in _read_lines(main / f"{name}_{phase}.txt"):
                fields = line.split()
                if len(fields) >= 2 and int(fields[-1]) == 1:
                    file_name = fields[0] + ".jpg"
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


def format_coco(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """COCO 2014 from ``annotations/instances_{train,val}2014.json``.

    Rows: the images with at least one instance annotation (crowd included), ordered by image id *as strings*;
    columns: the ``categories`` list in file order (ids have gaps); names ``train2014/COCO_train2014_%012d.jpg``.
    """
    out, categories = {}, None
    for phase in ("train", "val"):
        path = root / "annotations" / f"instances_{phase}2014.json"
        print(f"[coco] reading {path} ...")
        with open(_existing(path)) as f:
            data = json.load(f)
        if categories is None:
            categories = [c["id"] for c in data["categories"]]
        elif categories != [c["id"] for c in data["categories"]]:
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


def format_cub(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CUB-200-2011: the 312 attributes' ``is_present`` from ``attributes/image_attribute_labels.txt``, images in
    ``images.txt`` order, split by ``train_test_split.txt`` (1 = train, else test). Some lines of the real label file
    carry extra fields; only the first three (image id, attribute id, is_present) are read."""
    cub = root / "CUB_200_2011"
    images = [line.split(maxsplit=1) for line in _read_lines(cub / "images.txt")]
    image_row = {int(image_id): i for i, (image_id, _) in enumerate(images)}
    is_train = {
        int(a): int(b) == 1 for a, b in (line.split()[:2] for line in _read_lines(cub / "train_test_split.txt"))
    }
    num_attributes = DATASET_INFO["cub"].num_classes
    labels = np.full((len(images), num_attributes), -1, dtype=np.int64)
    for line in _read_lines(cub / "attributes" / "image_attribute_labels.txt"):
        image_id, attribute_id, is_present = (int(x) for x in line.split()[:3])
        labels[image_row[image_id], attribute_id - 1] = is_present
    if (labels < 0).any():
        row, col = np.argwhere(labels < 0)[0]
        raise DataError(f"image_attribute_labels.txt has no line for image {images[row][0]}, attribute {col + 1}.")
    train = np.array([is_train[int(image_id)] for image_id, _ in images])
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
    classes = [line.strip() for line in _read_lines(base / "classes-trainable.txt") if line.strip()]
    if len(classes) != DATASET_INFO["openimages"].num_classes:
        raise DataError(f"{base / 'classes-trainable.txt'} lists {len(classes)} classes; the 2017_11 release (V3) has "
                        f"{DATASET_INFO['openimages'].num_classes}. Use that release's file.")  # fmt: skip
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
        fields = header.decode().strip().split(",")
        try:
            i_id, i_label, i_conf = fields.index("ImageID"), fields.index("LabelName"), fields.index("Confidence")
        except ValueError:
            raise DataError(f"{path} does not start with the header ImageID,Source,LabelName,Confidence.") from None
        for line in f:
            bar.update(len(line))
            parts = line.split(b",")
            col = column.get(parts[i_label].decode())
            if col is None:
                continue
            try:
                ids.append(int(parts[i_id], 16))
            except ValueError:
                raise DataError(f"{path}: ImageID {parts[i_id]!r} is not a 16-digit hex id.") from None
            cols.append(col)
            values.append(1 if float(parts[i_conf]) > 0.5 else -1)
    return np.frombuffer(ids, np.uint64), np.frombuffer(cols, np.int32), np.frombuffer(values, np.int8)


def _hex_ids(ids: np.ndarray) -> np.ndarray:
    """uint64 -> 16 lowercase hex digits as bytes (OpenImages ImageIDs), vectorised."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    nibbles = (ids[:, None] >> shifts) & np.uint64(15)
    return digits[nibbles.astype(np.int64)].view("S16").ravel()


def _read_lines(path: Path) -> list[str]:
    return _existing(path).read_text().splitlines()


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"Missing {path}. See data/README.md for the files each dataset needs.")
    return path


FORMATTERS = {"pascal": format_pascal, "coco": format_coco, "cub": format_cub, "openimages": format_openimages}
RAW_MARKERS = {  # a file whose presence says the raw annotations are there
    "pascal": "VOCdevkit/VOC2012/ImageSets/Main/aeroplane_train.txt",
    "coco": "annotations/instances_train2014.json",
    "cub": "CUB_200_2011/attributes/image_attribute_labels.txt",
    "openimages": "2017_11/classes-trainable.txt",
}


def formatted_files(dataset: str) -> list[str]:
    """The files ``format_dataset`` writes (observed labels excluded: the loader generates those)."""
    info = DATASET_INFO[dataset]
    label_files = SparseLabels.files if info.sparse else (lambda phase: [f"formatted_{phase}_labels.npy"])
    return [name for phase in info.phases for name in [f"formatted_{phase}_images.npy", *label_files(phase)]]


def format_dataset(name: str, root: str | os.PathLike) -> None:
    """Read the raw official annotations under ``root`` and write the formatted files that are missing.

    Files that exist are never rewritten (the official tools' files, or an earlier run's). NUS-WIDE and the synthetic
    dataset have no raw form here: NUS-WIDE comes as formatted files (Cole et al.'s re-crawled subset).
    """
    root = Path(root)
    missing = [f for f in formatted_files(name) if not (root / f).exists()]
    if not missing:
        return
    for phase in DATASET_INFO[name].phases:  # the three parts of a sparse matrix only make sense together
        parts = SparseLabels.files(phase) if DATASET_INFO[name].sparse else []
        if 0 < sum((root / f).exists() for f in parts) < len(parts):
            raise DataError(f"Only some of {', '.join(parts)} exist in {root}. Delete them and run again to format "
                            "the raw annotations anew.")  # fmt: skip
    if name not in FORMATTERS or not (root / RAW_MARKERS[name]).exists():
        raise DataError(_missing_data_message(name, root, missing))
    print(f"[{name}] formatting the raw annotations in {root} (once) ...")
    for phase, (names, labels) in FORMATTERS[name](root).items():
        if not (root / f"formatted_{phase}_images.npy").exists():
            checkpoint.save_npy_atomic(root / f"formatted_{phase}_images.npy", names)
        if isinstance(labels, SparseLabels):
            if not any((root / f).exists() for f in SparseLabels.files(phase)):
                labels.save(root, phase)
        elif not (root / f"formatted_{phase}_labels.npy").exists():
            checkpoint.save_npy_atomic(root / f"formatted_{phase}_labels.npy", labels)
    print(f"[{name}] wrote {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------------------------
# Formatted files -> splits.


def _missing_data_message(dataset: str, root: Path, missing: list[str]) -> str:
    return (
        f"No formatted {dataset} data in {root} (missing: {', '.join(missing)}), and no raw annotations to make them "
        f"from.\nSee data/README.md (and data/{dataset}/README.md) for where to download {dataset} and how to lay it "
        "out, or point --data_root at the folder that holds it."
    )


def _check_labels(path: Path, labels: np.ndarray, num_images: int, num_classes: int, allowed: tuple) -> None:
    if labels.ndim != 2 or labels.shape[0] != num_images or labels.shape[1] != num_classes:
        raise DataError(
            f"{path} has shape {labels.shape}, but the images file lists {num_images} images and the dataset has "
            f"{num_classes} classes. The formatted files disagree: regenerate them (data/README.md)."
        )
    bad = ~np.isin(labels, allowed)
    if bad.any():
        raise DataError(
            f"{path} holds values other than {allowed} ({int(bad.sum())} entries, e.g. {labels[bad][0]!r}). "
            "Regenerate it (data/README.md)."
        )


def load_formatted(dataset: str, root: str | os.PathLike) -> dict[str, dict]:
    """Per phase: ``images`` (names), ``labels`` (full 0/1 matrix, or SparseLabels) and ``labels_obs``.

    Formats the raw annotations first when the formatted files are missing. Observed labels come from
    ``formatted_{phase}_labels_obs.npy``, generated with the official generator and cached when absent (an existing
    file, e.g. from the official tools, is used as it is). OpenImages' observed labels are its real partial labels.
    """
    root = Path(root)
    info = DATASET_INFO[dataset]
    format_dataset(dataset, root)
    data = {}
    for phase in info.phases:
        images = np.load(root / f"formatted_{phase}_images.npy", allow_pickle=False)
        if info.sparse:
            labels = SparseLabels.load(root, phase, info.num_classes)
            if len(labels) != len(images):
                raise DataError(f"formatted_{phase}_images.npy lists {len(images)} images but its label files have "
                                f"{len(labels)} rows. Delete both and format again.")  # fmt: skip
            data[phase] = {"images": images, "labels": labels, "labels_obs": labels}
            continue
        labels = np.load(root / f"formatted_{phase}_labels.npy", allow_pickle=False)
        _check_labels(root / f"formatted_{phase}_labels.npy", labels, len(images), info.num_classes, (0, 1))
        obs_path = root / f"formatted_{phase}_labels_obs.npy"
        if obs_path.exists():
            observed = np.load(obs_path, allow_pickle=False)
            _check_labels(obs_path, observed, len(images), info.num_classes, (-1, 0, 1))
        else:
            observed = observe_labels(labels)
            checkpoint.save_npy_atomic(obs_path, observed)
        data[phase] = {"images": images, "labels": labels, "labels_obs": observed}
    return data


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
    """
    root = Path(cfg.data_root)
    info = DATASET_INFO[cfg.dataset]
    if cfg.dataset == "synthetic":
        import synthetic

        synthetic.ensure_dataset(root)
    data = load_formatted(cfg.dataset, root)
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
    _report_rows_without_positives(splits)
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


def check_images_exist(splits: dict[str, Split]) -> None:
    """Every listed image must exist before training starts; say how many are missing and which."""
    total = sum(len(s) for s in splits.values())
    missing: list[str] = []
    count = 0
    with tqdm(total=total, desc="checking images", disable=total < 200_000, leave=False) as bar:
        for split in splits.values():
            for i in range(len(split)):
                path = split.image_path(i)
                if not os.path.exists(path):
                    count += 1
                    if len(missing) < 5:
                        missing.append(path)
            bar.update(len(split))
    if count:
        shown = "\n  ".join(missing)
        raise DataError(
            f"{count} of {total} listed images are missing, for example:\n  {shown}\n"
            "Check --data_root and that the image archives are fully extracted (data/README.md)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Images.


def load_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 H x W x 3, resized to size x size with PIL bilinear: the paper's ``Resize((size, size))`` before
    ``ToTensor``, pixel for pixel."""
    try:
        with Image.open(path) as raw:
            return np.array(raw.convert("RGB").resize((size, size), Image.BILINEAR))
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot decode image {path}: {err}. Replace or remove the file.") from None


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 image C x H x W, row index)``; labels stay with the trainer, which owns them.

    Decodes and resizes each image with PIL (in the DataLoader's workers), or, with ``cache``, reads the already
    resized pixels from a disk cache (``build_disk_cache``): the same bytes either way.
    """

    def __init__(self, split: Split, image_size: int, cache: Path | None = None) -> None:
        self.split = split
        self.image_size = image_size
        self.cache = cache
        self._pixels: np.ndarray | None = None  # the cache's memory map, opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = index if index >= 0 else -1 - index  # -1 - row: a padding copy of ``row`` (distributed.share)
        if self.cache is None:
            image = load_image(self.split.image_path(row), self.image_size)
        else:
            if self._pixels is None:
                size = self.split.whole_size or len(self.split)
                self._pixels = _open_cache(self.cache, size, self.image_size, "r")
            image = np.array(self._pixels[self.split.offset + row])
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), index

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
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(num_images, image_size, image_size, 3))


def _cache_done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done.npy")


def disk_cache_complete(path: Path, num_images: int) -> bool:
    done_path = _cache_done_path(path)
    if not (path.exists() and done_path.exists()):
        return False
    done = np.load(done_path)
    return len(done) == num_images and bool(done.all())


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
    if disk_cache_complete(path, n):
        return path
    need = n * image_size * image_size * 3
    path.parent.mkdir(parents=True, exist_ok=True)
    done_path = _cache_done_path(path)
    done = np.load(done_path) if done_path.exists() and path.exists() else np.zeros(n, dtype=bool)
    free = shutil.disk_usage(path.parent).free + (path.stat().st_size if path.exists() else 0)
    print(f"disk cache: {n} images x {image_size}x{image_size}x3 = {need / 1e9:.2f} GB in {path} "
          f"({int(done.sum())} already done; {free / 1e9:.1f} GB free)")  # fmt: skip
    if need > free - 2**30:
        raise DataError(f"The disk cache needs {need / 1e9:.2f} GB in {path.parent}, but only {free / 1e9:.2f} GB are "
                        "free (keeping 1 GB spare). Free some space, or train without --cache disk.")  # fmt: skip
    if not path.exists():
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
                checkpoint.save_npy_atomic(done_path, done)
                bar.update(len(indices))
                if on_chunk is not None:
                    on_chunk(int(done.sum()))
    finally:
        if pool is not None:
            pool.terminate()
        checkpoint.save_npy_atomic(done_path, done)
    return path


def to_model_input(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalised float: ``RandomHorizontalFlip`` (where ``flip``), ``ToTensor``, ``Normalize``.
    Same arithmetic as torchvision's transforms, run on whatever device the batch is on; channels-last layout, which
    the convolutions run fastest on (CPU and GPU alike)."""
    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    x = images.float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub(mean).div(std).contiguous(memory_format=torch.channels_last)


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


EVAL_BATCH_FACTOR = 4  # evaluation has no gradients and BatchNorm in eval mode: larger batches, same scores


def make_loader(split: Split, cfg, *, train: bool, pin_memory: bool, cache: Path | None = None, ctx=None):
    """Batches of ``(uint8 images, row indices)``: ``EpochBatches`` order, decoding in ``cfg.num_workers`` processes,
    pinned memory for the copy to the GPU, workers kept across epochs and several batches prefetched. Training
    batches are shares of the global batches under torchrun (``ctx``)."""
    batch_size = cfg.bsize if train else cfg.bsize * EVAL_BATCH_FACTOR
    rank, world = (ctx.rank, ctx.world) if (train and ctx is not None) else (0, 1)
    sampler = EpochBatches(len(split), batch_size, shuffle=train, seed=cfg.seed, rank=rank, world=world)
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        ImageDataset(split, cfg.image_size, cache),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Class names (for figures; the formatted files carry none).


def class_names(dataset: str, root: str | os.PathLike) -> list[str]:
    """The classes' names in column order, from the raw files when they are there, else ``class <i>``."""
    root = Path(root)
    num_classes = DATASET_INFO[dataset].num_classes
    names: list[str] = []
    if dataset == "synthetic":
        import synthetic

        names = list(synthetic.CLASS_NAMES)
    elif dataset == "pascal":
        names = list(VOC_CLASSES)
    elif dataset == "coco" and (root / "annotations" / "instances_val2014.json").exists():
        with open(root / "annotations" / "instances_val2014.json") as f:
            names = [c["name"] for c in json.load(f)["categories"]]
    elif dataset == "cub" and (root / "attributes.txt").exists():
        names = [line.split(maxsplit=1)[1] for line in _read_lines(root / "attributes.txt") if line.strip()]
    elif dataset == "nuswide" and (root / "Concepts81.txt").exists():
        names = [line.strip() for line in _read_lines(root / "Concepts81.txt") if line.strip()]
    elif dataset == "openimages" and (root / "2017_11" / "class-descriptions.csv").exists():
        described = dict(
            line.split(",", 1) for line in _read_lines(root / "2017_11" / "class-descriptions.csv") if "," in line
        )
        mids = [line.strip() for line in _read_lines(root / "2017_11" / "classes-trainable.txt") if line.strip()]
        names = [described.get(mid, mid).strip().strip('"') for mid in mids]
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------------------------------
# ``python datasets.py <name>``: prepare a dataset without training.


def prepare(dataset: str, root: str | os.PathLike | None = None) -> None:
    """Format the raw annotations, generate the observed labels, check the images, and print a summary."""
    root = Path(root) if root else Path(__file__).resolve().parent / "data" / dataset
    if dataset == "synthetic":
        import synthetic

        synthetic.ensure_dataset(root)
    data = load_formatted(dataset, root)
    image_dir = str(root / DATASET_INFO[dataset].image_dir)
    splits = {phase: Split(image_dir, d["images"], d["labels"], d["labels_obs"]) for phase, d in data.items()}
    _report_rows_without_positives(splits)
    check_images_exist(splits)
    sizes = ", ".join(f"{phase} {len(split)}" for phase, split in splits.items())
    print(f"{dataset} is ready in {root}: {sizes} images, {DATASET_INFO[dataset].num_classes} classes.")


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=prepare.__doc__)
    parser.add_argument("dataset", choices=sorted(DATASET_INFO))
    parser.add_argument("--data_root", default=None, help="default: data/<dataset> in the repository")
    args = parser.parse_args()
    try:
        prepare(args.dataset, args.data_root)
    except DataError as err:
        sys.exit(f"error: {err}")
