"""Formatted label files -> observed (single positive) labels -> train/val/test splits -> image loaders.

The rules that decide the numbers follow the official tools exactly (PAPER_FACTS section 3): the observed-label
generator, the 80/20 split of the official train split and the optional subsampling are pure, seeded functions of a
label matrix, tested without any image. Images are decoded and resized with PIL exactly as the paper's transforms do;
the loader hands uint8 batches to the trainer, which flips and normalises them on the device (``to_model_input``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OBSERVED_SEED = 1200  # the official generator's seed, fresh for each split file
PHASES = ("train", "val")  # the formatted files: the official train split, and the official val split (our test)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_dir: str  # where the file names listed in formatted_*_images.npy are relative to, inside the data root


DATASET_INFO = {
    "synthetic": DatasetInfo(16, "images"),
    "pascal": DatasetInfo(20, "VOCdevkit/VOC2012/JPEGImages"),
    "coco": DatasetInfo(80, ""),
    "nuswide": DatasetInfo(81, "Flickr"),
    "cub": DatasetInfo(312, "CUB_200_2011/images"),
}


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
# Formatted files.


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _missing_data_message(dataset: str, root: Path, missing: list[str]) -> str:
    return (
        f"No formatted {dataset} data in {root} (missing: {', '.join(missing)}).\n"
        f"See data/README.md for where to download {dataset} and the one command that prepares it, "
        "or point --data_root at the folder holding the formatted_*.npy files."
    )


def load_formatted(dataset: str, root: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Load ``formatted_{train,val}_{images,labels}.npy`` and the observed labels, generating and caching
    ``formatted_{phase}_labels_obs.npy`` with the official generator when absent (an existing file is used as is)."""
    root = Path(root)
    needed = [f"formatted_{phase}_{kind}.npy" for phase in PHASES for kind in ("images", "labels")]
    missing = [name for name in needed if not (root / name).exists()]
    if missing:
        raise DataError(_missing_data_message(dataset, root, missing))
    num_classes = DATASET_INFO[dataset].num_classes
    data = {}
    for phase in PHASES:
        images = np.load(root / f"formatted_{phase}_images.npy", allow_pickle=False)
        labels = np.load(root / f"formatted_{phase}_labels.npy", allow_pickle=False)
        _check_labels(root / f"formatted_{phase}_labels.npy", labels, len(images), num_classes, (0, 1))
        obs_path = root / f"formatted_{phase}_labels_obs.npy"
        if obs_path.exists():
            observed = np.load(obs_path, allow_pickle=False)
            _check_labels(obs_path, observed, len(images), num_classes, (-1, 0, 1))
        else:
            observed = observe_labels(labels)
            _save_atomic(obs_path, observed)
        data[phase] = {"images": images, "labels": labels, "labels_obs": observed}
    return data


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


@dataclass(frozen=True)
class Split:
    """One split: image paths, full 0/1 labels (float32) and observed -1/0/1 labels (int8), rows aligned."""

    image_paths: np.ndarray
    labels: np.ndarray
    observed: np.ndarray

    def __len__(self) -> int:
        return len(self.image_paths)


def build_splits(cfg) -> dict[str, Split]:
    """train / val (the official 80/20 split of the official train split, optionally subsampled) and test (the
    official val split), with observed labels for training and clean labels for val and test."""
    root = Path(cfg.data_root)
    if cfg.dataset == "synthetic":
        import synthetic

        synthetic.ensure_dataset(root)
    data = load_formatted(cfg.dataset, root)
    train_idx, val_idx = split_indices(len(data["train"]["images"]), cfg.val_frac, cfg.split_seed)
    train_idx, val_idx = subsample_indices(train_idx, val_idx, cfg.ss_frac_train, cfg.ss_frac_val, cfg.ss_seed)
    image_dir = root / DATASET_INFO[cfg.dataset].image_dir

    def make(phase: str, idx: np.ndarray | None) -> Split:
        d = data[phase]
        idx = np.arange(len(d["images"])) if idx is None else idx
        paths = np.array([str(image_dir / str(name)) for name in d["images"][idx]])
        return Split(paths, d["labels"][idx].astype(np.float32), d["labels_obs"][idx].astype(np.int8))

    splits = {"train": make("train", train_idx), "val": make("train", val_idx), "test": make("val", None)}
    if cfg.train_set_variant == "clean":
        train = splits["train"]
        splits["train"] = Split(train.image_paths, train.labels, np.where(train.labels > 0, 1, -1).astype(np.int8))
    check_images_exist(splits)
    return splits


def check_images_exist(splits: dict[str, Split]) -> None:
    missing = [p for split in splits.values() for p in split.image_paths if not os.path.exists(p)]
    if missing:
        total = sum(len(s) for s in splits.values())
        shown = "\n  ".join(missing[:5])
        raise DataError(
            f"{len(missing)} of {total} listed images are missing, for example:\n  {shown}\n"
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
    """Items are ``(uint8 image C x H x W, row index)``; labels stay with the trainer, which owns them."""

    def __init__(self, image_paths: np.ndarray, image_size: int) -> None:
        self.image_paths = image_paths
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.image_paths[index], self.image_size)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), index


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
    horizontal flip for the epoch, so batch order and augmentation never depend on workers or processes."""

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, seed: int = 0) -> None:
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.flips = torch.rand(self.num_items, generator=_epoch_generator(self.seed, epoch, 1)) < 0.5

    def __len__(self) -> int:
        return -(-self.num_items // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=_epoch_generator(self.seed, self.epoch, 0))
        else:
            order = torch.arange(self.num_items)
        yield from (batch.tolist() for batch in order.split(self.batch_size))


def make_loader(split: Split, cfg, *, train: bool, pin_memory: bool) -> torch.utils.data.DataLoader:
    sampler = EpochBatches(len(split), cfg.bsize, shuffle=train, seed=cfg.seed)
    return torch.utils.data.DataLoader(
        ImageDataset(split.image_paths, cfg.image_size),
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.num_workers > 0,
    )
