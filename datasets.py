"""The datasets: one entry each (``DATASET_INFO``), their formatted files -> checked splits -> ``Data``, and the
derived folder each dataset's generated files go to.

This is the face the rest of the tool loads a dataset through (``build_data``). Beside it: ``formats.py`` (raw
official annotations -> formatted files), ``label_rules.py`` (the observed-label rules, the split, sparse labels) and
``loaders.py`` (decoding, the disk cache, the device copies, the sampler and the worker pool). The rules that decide
the numbers follow the official tools exactly (Cole et al.'s formatting scripts, which the LL authors' release uses).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python datasets.py NAME`: the older spelling of `python prepare_data.py NAME`
    import os
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
    os.execv(sys.executable, [sys.executable, script, *sys.argv[1:]])

import dataclasses
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from tqdm import tqdm

import files
import formats
import label_rules
import loaders
from label_rules import DataError  # the data modules' one error: callers catch datasets.DataError

NUM_GROUPS = 5  # OpenImages: classes in five groups by number of annotated training positives


OFFICIAL_DEFAULTS = {"arch": "resnet50", "image_size": 448, "num_epochs": 10}  # the paper's, for every real dataset


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything the tool knows about one dataset, in one place (``DATASET_INFO``): adding a dataset is one entry.

    ``defaults``: the dataset-level training presets (optimiser, learning rate, architecture, image size, epochs), the
    LL authors' published settings for the real datasets. ``formatter(root)`` turns the raw official annotations into
    ``{phase: (names, labels)}``; ``raw_marker`` is a file (relative to the data root) whose presence says they are
    there. ``read_class_names(root)`` gives the column names from the raw files (``[]`` when they are absent).
    ``prepare(root)`` generates the dataset itself (the synthetic one: registered by ``synthetic.py``, which this
    module does not import); ``smallcnn_weights(root)`` makes (once) and returns the file of a pretrained ``smallcnn``
    backbone for it (the synthetic one, likewise). ``sparse``: partially annotated labels stored as CSR whose
    annotated entries are the observed labels (OpenImages): no observed-label generator, no full labels, unknown
    entries not scored.

    ``method_constants``: the constants the methods use on this dataset, ``{method: {flag: value}}``, keyed by the
    entry (or table row, e.g. ``"LL-R+BoostLU"``) of the method registry whose constants they are; the method's entry
    reads them with ``registry.from_dataset`` (docs/extending.md). A method with no value here is refused on the
    dataset with a message naming the flag to give, unless its entry names a general default (GR Loss's released
    values); it never gets another method's or another dataset's value.
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
    smallcnn_weights: Callable[[Path], Path] | None = None
    method_constants: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)


def _defaults(optimizer: str, lr: float, **overrides) -> Mapping[str, object]:
    return MappingProxyType({**OFFICIAL_DEFAULTS, "optimizer": optimizer, "lr": lr, **overrides})


# ---------------------------------------------------------------------------------------------------------------------
# The datasets: one entry each.

# Each entry's ``method_constants`` are the methods' published settings on it (docs/methods.md gives the sources):
# - delta_rel of LL-R, LL-Ct, LL-Cp: the best settings the LL authors posted (official repository
#   snucml/LargeLossMatters, issue #4);
# - BoostLU's delta_rel with each scheme (Kim et al., CVPR 2023; youngwk/BridgeGapExplanationPAMC), the same on every
#   real dataset;
# - expected_num_pos (EPR, and ROLE, which reads EPR's): the expected positives per image of Cole et al. (CVPR 2021);
# - em_alpha (EM, and EM+APL, which reads EM's), apl_beta, apl_warmup: Zhou et al.'s (ECCV 2022) released defaults.
# - AEVLP's scorer, grid, pseudo-label rule and loss constants (Fsoft-AIC/AEVLP's per-dataset configs; their GR Loss
#   schedules are gr_w, gr_b, gr_q3 here). VLPL's scorer is the same on every dataset (its paper's, methods.py); the
#   synthetic entry names the stand-in scorer for both (docs/vlp.md), with VOC's values for AEVLP's.
# GR Loss reads its authors' released values on every dataset (a general default, methods.py) unless an entry has
# its own under "gr".
BOOSTLU_DELTA_REL = {
    "LL-R+BoostLU": {"delta_rel": 0.5},
    "LL-Ct+BoostLU": {"delta_rel": 0.2},
    "LL-Cp+BoostLU": {"delta_rel": 0.1},
}

DATASET_INFO: dict[str, DatasetInfo] = {
    "pascal": DatasetInfo(
        20, "VOCdevkit/VOC2012/JPEGImages", "VOC12", _defaults("sgd", 5e-3),
        formatter=formats.format_pascal, raw_marker="VOCdevkit/VOC2012/ImageSets/Main/aeroplane_train.txt",
        read_class_names=lambda root: list(formats.VOC_CLASSES),
        method_constants={"LL-R": {"delta_rel": 0.2}, "LL-Ct": {"delta_rel": 0.2}, "LL-Cp": {"delta_rel": 0.1},
                          **BOOSTLU_DELTA_REL, "epr": {"expected_num_pos": 1.5}, "em": {"em_alpha": 0.2},
                          "em_apl": {"apl_beta": 0.02, "apl_warmup": 5},
                          "aevlp": {"vlp_clip": "ViT-B-16", "vlp_grid": 4, "vlp_temperature": 0.01,
                                    "vlp_threshold": 0.5, "vlp_negatives": 0.2, "aevlp_top_k": 3, "aevlp_eta": 0.0,
                                    "aevlp_lambda": (0.7, 0.4), "aevlp_reg": 0.05, "gr_w": (0.0, 2.0),
                                    "gr_b": (-2.0, -2.0), "gr_q3": 1.0}},
    ),
    "coco": DatasetInfo(
        formats.COCO_NUM_CLASSES, "", "COCO14", _defaults("adam", 1e-5),
        formatter=formats.format_coco, raw_marker="annotations/instances_train2014.json",
        read_class_names=formats.coco_class_names,
        method_constants={"LL-R": {"delta_rel": 0.4}, "LL-Ct": {"delta_rel": 0.2}, "LL-Cp": {"delta_rel": 0.2},
                          **BOOSTLU_DELTA_REL, "epr": {"expected_num_pos": 2.9}, "em": {"em_alpha": 0.1},
                          "em_apl": {"apl_beta": 0.9, "apl_warmup": 5},
                          "aevlp": {"vlp_clip": "ViT-B-16", "vlp_grid": 4, "vlp_temperature": 0.01,
                                    "vlp_threshold": 0.5, "vlp_negatives": 0.3, "aevlp_top_k": 3, "aevlp_eta": 0.3,
                                    "aevlp_lambda": (0.7, 0.5), "aevlp_reg": 0.001, "gr_w": (0.0, 10.0),
                                    "gr_b": (-2.0, -8.0), "gr_q3": 1.0}},
    ),
    # NUS-WIDE comes as formatted files (Cole et al.'s re-crawled subset): no raw form here.
    "nuswide": DatasetInfo(
        81, "Flickr", "NUS-WIDE", _defaults("adam", 1e-5), read_class_names=formats.listed_names("Concepts81.txt"),
        method_constants={"LL-R": {"delta_rel": 0.4}, "LL-Ct": {"delta_rel": 0.2}, "LL-Cp": {"delta_rel": 0.2},
                          **BOOSTLU_DELTA_REL, "epr": {"expected_num_pos": 1.9}, "em": {"em_alpha": 0.1},
                          "em_apl": {"apl_beta": 0.2, "apl_warmup": 4},
                          "aevlp": {"vlp_clip": "ViT-B-16", "vlp_grid": 4, "vlp_temperature": 0.01,
                                    "vlp_threshold": 0.6, "vlp_negatives": 0.2, "aevlp_top_k": 3, "aevlp_eta": 0.3,
                                    "aevlp_lambda": (0.7, 0.5), "aevlp_reg": 0.001, "gr_w": (0.0, 10.0),
                                    "gr_b": (-2.0, -8.0), "gr_q3": 1.0}},
    ),
    "cub": DatasetInfo(
        formats.CUB_NUM_ATTRIBUTES, "CUB_200_2011/images", "CUB", _defaults("adam", 7.5e-5),
        formatter=formats.format_cub, raw_marker="CUB_200_2011/attributes/image_attribute_labels.txt",
        read_class_names=formats.listed_names("attributes.txt", part=1),
        method_constants={"LL-R": {"delta_rel": 0.4}, "LL-Ct": {"delta_rel": 0.4}, "LL-Cp": {"delta_rel": 0.2},
                          **BOOSTLU_DELTA_REL, "epr": {"expected_num_pos": 31.4}, "em": {"em_alpha": 0.01},
                          "em_apl": {"apl_beta": 0.4, "apl_warmup": 3},
                          "aevlp": {"vlp_clip": "ViT-B-16", "vlp_grid": 5, "vlp_temperature": 0.1,
                                    "vlp_threshold": 0.005, "vlp_negatives": 0.2, "aevlp_top_k": 32, "aevlp_eta": 0.005,
                                    "aevlp_lambda": (0.8, 0.2), "aevlp_reg": 0.01, "gr_w": (0.0, 10.0),
                                    "gr_b": (-2.0, -8.0), "gr_q3": 1.5}},
    ),
    # The paper publishes no OpenImages settings: COCO's, the closest large-scale setting, as a starting point. No
    # expected number of positives is published for it: EPR and ROLE are not offered there (methods.py's not_on).
    "openimages": DatasetInfo(
        formats.OPENIMAGES_NUM_CLASSES, "", "OpenImages", _defaults("adam", 1e-5), ("train", "val", "test"),
        sparse=True,
        formatter=formats.format_openimages, raw_marker="2017_11/classes-trainable.txt",
        read_class_names=formats.openimages_class_names,
        method_constants={"LL-R": {"delta_rel": 0.4}, "LL-Ct": {"delta_rel": 0.2}, "LL-Cp": {"delta_rel": 0.2},
                          **BOOSTLU_DELTA_REL, "em": {"em_alpha": 0.1}, "em_apl": {"apl_beta": 0.9, "apl_warmup": 5}},
    ),
    # Generated by synthetic.py, which registers its generator as ``prepare`` and its pretrained backbone as
    # ``smallcnn_weights`` (register_prepare). Its settings were chosen for the embedded demo (docs/synthetic.md):
    # BoostLU keeps each scheme's own delta_rel there; 32x32 PNGs decode faster in the main process than through
    # loader workers (num_workers 0).
    "synthetic": DatasetInfo(
        16, "images", "synthetic", _defaults("adam", 1e-3, arch="smallcnn", image_size=32, num_workers=0),
        read_class_names=formats.synthetic_class_names,
        method_constants={"LL-R": {"delta_rel": 1.0}, "LL-Ct": {"delta_rel": 0.5}, "LL-Cp": {"delta_rel": 0.5},
                          "LL-R+BoostLU": {"delta_rel": 1.0}, "LL-Ct+BoostLU": {"delta_rel": 0.5},
                          "LL-Cp+BoostLU": {"delta_rel": 0.5}, "epr": {"expected_num_pos": 2.5},
                          "em": {"em_alpha": 0.1}, "em_apl": {"apl_beta": 0.2, "apl_warmup": 5},
                          "vlpl": {"vlp_clip": "standin", "vlp_grid": 4},
                          "aevlp": {"vlp_clip": "standin", "vlp_grid": 4, "vlp_temperature": 0.01, "vlp_threshold": 0.5,
                                    "vlp_negatives": 0.2, "aevlp_top_k": 3, "aevlp_eta": 0.0,
                                    "aevlp_lambda": (0.7, 0.4), "aevlp_reg": 0.05, "gr_w": (0.0, 2.0),
                                    "gr_b": (-2.0, -2.0), "gr_q3": 1.0}},
    ),
}  # fmt: skip


def register_prepare(
    dataset: str, prepare: Callable[[Path], object], smallcnn_weights: Callable[[Path], Path] | None = None
) -> None:
    """Set the function that generates ``dataset`` under a data root (called before its formatted files are read),
    and the one that makes its pretrained ``smallcnn`` backbone. ``synthetic.py`` registers its generator this way,
    so this module needs no import of it."""
    DATASET_INFO[dataset] = dataclasses.replace(
        DATASET_INFO[dataset], prepare=prepare, smallcnn_weights=smallcnn_weights
    )


def formatted_files(dataset: str) -> list[str]:
    """The files ``format_dataset`` writes (observed labels excluded: the loader generates those)."""
    info = DATASET_INFO[dataset]
    label_files = label_rules.SparseLabels.files if info.sparse else (lambda phase: [f"formatted_{phase}_labels.npy"])
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
        parts = label_rules.SparseLabels.files(phase) if info.sparse else []
        present = [str(find_file(f, root, out)) for f in parts if find_file(f, root, out).exists()]
        if 0 < len(present) < len(parts):
            raise DataError(
                f"Only some of the parts {', '.join(parts)} exist ({', '.join(present)}). Delete "
                f"{' and '.join(present)} and run again to format the raw annotations anew."
            )
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
        if isinstance(labels, label_rules.SparseLabels):
            if not any(find_file(f, root, out).exists() for f in label_rules.SparseLabels.files(phase)):
                labels.save(out, phase)
        elif not find_file(f"formatted_{phase}_labels.npy", root, out).exists():
            files.save_npy_atomic(out / f"formatted_{phase}_labels.npy", labels)
    where = "" if out == root else f" in {out}"
    print(f"[{name}] wrote {', '.join(missing)}{where}")


def _check_formatted_output(dataset: str, root: Path, phase: str, names: np.ndarray, labels) -> None:
    """What a formatter made must have the dataset's class count, one label row per image and at least one image;
    otherwise the raw files are not the official ones, and nothing is written."""
    info = DATASET_INFO[dataset]
    num_classes = labels.num_classes if isinstance(labels, label_rules.SparseLabels) else labels.shape[1]
    problem = None
    if num_classes != info.num_classes:
        problem = f"{num_classes} classes, but {info.title} has {info.num_classes}"
    elif len(names) != len(labels):
        problem = f"{len(names)} image names but {len(labels)} label rows in the {phase} split"
    elif len(names) == 0:
        problem = f"no image in the {phase} split"
    if problem:
        raise DataError(
            f"The raw annotations in {root} give {problem}: they are not the official {info.title} files. "
            f"Nothing was written. Use the files data/{dataset}/README.md names."
        )


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
    for wrong, what in (
        (wrong_pos, "observed positives that are not true positives"),
        (wrong_neg, "observed negatives that are true positives"),
    ):
        if wrong.any():
            row, col = np.argwhere(wrong)[0]
            raise DataError(
                f"{path} does not match the full labels: {int(wrong.sum())} of its {int((observed != 0).sum())} "
                f"observed entries are {what} (the first at row {row}, class {col}). {fix}"
            )


def load_formatted(
    dataset: str,
    root: str | os.PathLike,
    derived: str | os.PathLike | None = None,
    regime: label_rules.Regime | None = None,
) -> dict[str, dict]:
    """Per phase: ``images`` (names), ``labels`` (full 0/1 matrix, or label_rules.SparseLabels) and ``labels_obs``.

    Formats the raw annotations first when the formatted files are missing. Observed labels come from the regime's
    file (``formatted_{phase}_labels_obs.npy`` for the paper's), generated with the official generator and cached in
    ``derived`` (default: ``root``) when absent; an existing file (e.g. from the official tools) is used as it is once
    it is checked against the full labels. OpenImages' observed labels are its real partial labels. Label files of
    any numeric dtype (bool and uint8 included) are read as the numbers they hold.
    """
    root = Path(root)
    derived = Path(derived) if derived is not None else root
    info = DATASET_INFO[dataset]
    regime = regime if regime is not None else label_rules.Regime()
    if info.sparse and regime != label_rules.Regime():
        raise DataError(
            f"--num_pos, --num_neg and --label_proportion draw observed labels from full labels; "
            f"{info.title} has only partial labels (its annotated entries are what is observed). Leave "
            "them out."
        )
    format_dataset(dataset, root, derived)
    images_of, paths_of = {}, {}
    for phase in info.phases:
        images_path = paths_of[phase] = find_file(f"formatted_{phase}_images.npy", root, derived)
        images = label_rules.load_npy(images_path, _formatted_fix(dataset, root, [images_path]))
        if images.ndim != 1 or images.dtype.kind not in "US" or len(images) == 0:
            what = "no image names" if images.dtype.kind in "US" and images.ndim == 1 else "no 1-D list of names"
            raise DataError(
                f"{images_path} holds {what} (shape {images.shape}, dtype {images.dtype}). "
                f"{_formatted_fix(dataset, root, [images_path])}"
            )
        images_of[phase] = images
    _check_distinct_names(dataset, root, derived, images_of)
    data = {}
    for phase in info.phases:
        images_path, images = paths_of[phase], images_of[phase]
        if info.sparse:
            parts = [find_file(name, root, derived) for name in label_rules.SparseLabels.files(phase)]
            labels = label_rules.SparseLabels.load(parts[0].parent, phase, info.num_classes)
            if len(labels) != len(images):
                raise DataError(
                    f"{images_path} lists {len(images)} images but its label files have {len(labels)} "
                    f"rows. {_formatted_fix(dataset, root, [images_path, *parts])}"
                )
            data[phase] = {"images": images, "labels": labels, "labels_obs": labels}
            continue
        labels_path = find_file(f"formatted_{phase}_labels.npy", root, derived)
        fix = _formatted_fix(dataset, root, [images_path, labels_path])
        labels = label_rules.load_npy(labels_path, fix)
        _check_labels(labels_path, labels, len(images), info.num_classes, (0, 1), fix)
        if phase == "train" and not labels.any():  # every observed label drawn from it would be unknown or negative
            raise DataError(
                f"{labels_path} holds no positive label among its {len(labels)} training images: it is "
                f"damaged or not this dataset's labels file. {fix}"
            )
        obs_name = regime.file(phase)
        observed = _existing_observed(find_file(obs_name, root, derived), labels)
        if observed is None:
            with files.data_lock(derived, f"The data folder {derived} (observed labels being written)"):
                observed = _existing_observed(derived / obs_name, labels)  # another process may have made it
                if observed is None:
                    observed = regime.observe(labels)
                    files.save_npy_atomic(derived / obs_name, observed)
        if phase == "train" and not observed.any():  # training would see all-unknown labels and learn nothing
            fix = (
                "give a larger --label_proportion"
                if regime.proportion is not None
                else f"the file is damaged: delete {find_file(obs_name, root, derived)} to regenerate it"
            )
            raise DataError(
                f"The regime '{regime.describe()}' observes no label at all among the {len(labels)} "
                f"training images ({obs_name}): {fix}."
            )
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
        labels = label_rules.SparseLabels.files(phase) if info.sparse else [f"formatted_{phase}_labels.npy"]
        return [find_file(f, root, derived) for f in [f"formatted_{phase}_images.npy", *labels]]

    phases = list(dict.fromkeys(phase for phase, _ in places))
    fix = _formatted_fix(dataset, root, [path for phase in phases for path in phase_files(phase)])
    if len(phases) == 1:
        rows = [str(row) for _, row in places]
        listed = f"{', '.join(rows[:-1])} and {rows[-1]}" if len(rows) <= 5 else f"{', '.join(rows[:5])}, ..."
        raise DataError(
            f"{phase_files(phases[0])[0]} lists the image {name!r} {len(rows)} times (rows {listed}): "
            "each image must be listed once (a repeated one could land in both training and validation, "
            f"with conflicting labels). {fix}"
        )
    (first, row_a), (second, row_b) = places[0], next(place for place in places if place[0] != places[0][0])
    raise DataError(
        f"{phase_files(second)[0]} lists the image {name!r} (row {row_b}), which {phase_files(first)[0]} "
        f"lists too (row {row_a}): the {first} and {second} splits must not share an image (it would be "
        f"trained on and scored). {fix}"
    )


def repeated_name(names_of: Mapping[str, np.ndarray]) -> tuple[str, list[tuple[str, int]]] | None:
    """A name that the arrays of ``names_of`` (phase -> 1-D str or bytes names) list more than once, within one or
    across several, with its places ``[(phase, row), ...]`` in order; None when every name is distinct. Arrays that
    are each strictly increasing with disjoint ranges (as the formatter writes OpenImages' 3.4M names) take one
    comparison pass; others one ``np.unique``."""
    phases = list(names_of)
    arrays = [np.asarray(names_of[phase]) for phase in phases]
    if len({a.dtype.kind for a in arrays}) > 1:  # str and bytes mixed: compare as str
        arrays = [a if a.dtype.kind == "U" else np.char.decode(a, "utf-8", "replace") for a in arrays]
    arrays = [normalised_names(a) for a in arrays]  # files, not spellings: train/./x.png is train/x.png
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


def normalised_names(names: np.ndarray) -> np.ndarray:
    """Image names as the files they name: ``os.path.normpath`` of each name that a different spelling could hide
    (``./``, ``..``, ``//``, a trailing ``/``), so that ``train/./x.png`` and ``train/x.png`` compare equal. Names
    already normal (all of the official files') are kept as they are: one vectorised scan of the array."""
    names = np.asarray(names)
    if names.dtype.kind not in "US" or not names.size:
        return names
    dot, slash = ("/.", "//") if names.dtype.kind == "U" else (b"/.", b"//")
    start, end = ("." if names.dtype.kind == "U" else b"."), ("/" if names.dtype.kind == "U" else b"/")
    odd = np.strings.find(names, dot) >= 0
    odd |= np.strings.find(names, slash) >= 0
    odd |= np.strings.startswith(names, start) | np.strings.endswith(names, end)
    if not odd.any():
        return names
    out = names.copy()
    for i in np.flatnonzero(odd):
        out[i] = os.path.normpath(names[i].item())
    return out


def _existing_observed(path: Path, labels: np.ndarray) -> np.ndarray | None:
    if not path.exists():
        return None
    observed = label_rules.load_npy(path, f"Delete {path} to regenerate it.")
    check_observed(path, observed, labels)
    return observed


# ---------------------------------------------------------------------------------------------------------------------
# Where derived files go, and the lock that keeps two processes from writing them at once.

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
        print(
            f"note: the data root {root} is not writable: the files derived from it go to {folder}{temporary} "
            "(--cache_dir chooses another folder)"
        )
    return folder


@dataclass(frozen=True)
class Split:
    """One split: image names (relative to ``image_dir``), full labels and observed labels, rows aligned.

    Dense datasets: ``labels`` float32 0/1, ``observed`` int8 -1/0/1. OpenImages: both ``SparseLabels`` (-1/+1 where
    annotated, and the same object: its partial labels are what is observed and what is scored).
    """

    image_dir: str
    image_names: np.ndarray
    labels: np.ndarray | label_rules.SparseLabels
    observed: np.ndarray | label_rules.SparseLabels
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
    The observed training labels follow the regime of ``cfg`` (``label_rules.regime_of``); files the tool derives go to
    ``derived_dir(cfg)``.
    """
    root = Path(cfg.data_root)
    info = DATASET_INFO[cfg.dataset]
    regime = label_rules.regime_of(cfg)
    if info.prepare is not None:
        info.prepare(root)
    data = load_formatted(cfg.dataset, root, derived_dir(cfg), regime)
    if info.sparse:
        train_idx, val_idx = np.arange(len(data["train"]["images"])), np.arange(len(data["val"]["images"]))
        sources = {"train": "train", "val": "val", "test": "test"}
    else:
        train_idx, val_idx = label_rules.split_indices(len(data["train"]["images"]), cfg.val_frac, cfg.split_seed)
        sources = {"train": "train", "val": "train", "test": "val"}
    train_idx, val_idx = label_rules.subsample_indices(
        train_idx, val_idx, cfg.ss_frac_train, cfg.ss_frac_val, cfg.ss_seed
    )
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
    elif regime != label_rules.Regime():
        print(f"observed labels: {regime.describe()} ({regime.file('train')}); the paper used single positive only")
    _report_rows_without_positives(splits)
    _report_classes_without_positives(splits, lambda: class_names(cfg.dataset, root))
    check_images_exist(splits)
    groups = class_groups(data["train"]["labels"].positives_per_class()) if info.sparse else None
    return Data(**splits, num_classes=info.num_classes, class_groups=groups)


def _report_rows_without_positives(splits: dict[str, Split]) -> None:
    counts = {}
    for phase, split in splits.items():
        if isinstance(split.labels, label_rules.SparseLabels):
            rows_with = np.unique(split.labels.entries()[0][split.labels.values > 0])
            counts[phase] = len(split) - len(rows_with)
        else:
            counts[phase] = int((split.labels.max(axis=1) <= 0).sum()) if len(split) else 0
    if any(counts.values()):
        listed = ", ".join(f"{phase} {n} of {len(splits[phase])}" for phase, n in counts.items())
        print(f"images without any positive label (kept, as the official tools keep them): {listed}")


def classes_without_positives(labels: np.ndarray | label_rules.SparseLabels) -> np.ndarray:
    """The classes that enter a split's mAP with AP 0: no positive image (OpenImages: annotated entries but none
    positive; a class with no annotated entry at all is left out of its mAP, so it is not listed)."""
    if isinstance(labels, label_rules.SparseLabels):
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
        print(
            f"note: classes without any positive image: {'; '.join(parts)}. Each enters that split's mAP with AP 0: "
            "the official evaluation keeps every class in the mean, and so does this one."
        )


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
            part
            for part in (
                f"{missing} of {total} listed images are missing" if missing else "",
                f"{empty} of {total} are empty files (zero bytes)" if empty else "",
            )
            if part
        )
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
                loaders.load_image(split.image_path(int(row)), 8)
            except DataError as err:
                bad.append(str(err))
    if bad:
        listed = "\n  ".join(bad[:5])
        raise DataError(
            f"{len(bad)} of {tried} sampled images cannot be decoded:\n  {listed}\nReplace them: "
            "download and extract the image archives again (data/README.md)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Class names (for figures; the formatted files carry none).


def class_names(dataset: str, root: str | os.PathLike) -> list[str]:
    """The classes' names in column order, from the raw files when they are there, else ``class <i>``."""
    info = DATASET_INFO[dataset]
    names = info.read_class_names(Path(root)) if info.read_class_names is not None else []
    return names if len(names) == info.num_classes else [f"class {i}" for i in range(info.num_classes)]


# ---------------------------------------------------------------------------------------------------------------------
# Prepare a dataset without training (``python prepare_data.py <name>``).


def default_root(dataset: str) -> Path:
    """Where a dataset's files are when no --data_root is given: ``data/<dataset>`` in the repository."""
    return Path(__file__).resolve().parent / "data" / dataset


def prepare(dataset: str, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> None:
    """Format the raw annotations, generate the observed labels, check that every image is there and that a sample
    decodes, and print a summary."""
    root = Path(root) if root else default_root(dataset)
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
