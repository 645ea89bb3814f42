"""The embedded synthetic dataset: procedurally drawn multi-label shape images, written in the real on-disk form.

Why it exists: the paper's effect needs a backbone that already knows visual features when the partial labels
arrive (ImageNet does that for the real runs). Here the analogue is a small CNN pretrained, once, as a plain
single-label classifier on shapes of *other* classes than the multi-label ones. Both the multi-label data and the
pretrained backbone are generated deterministically and cached under ``data/synthetic/``, so ``python main.py``
works on a CPU with no download and exercises the same loading path as COCO or VOC.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

import datasets
import files
import loaders

# Bump when the drawing code changes, so a stale cache is rebuilt instead of silently reused.
GENERATOR_VERSION = 2
DATA_SEED = 2022
PRETRAIN_SEED = 7
NUM_TRAIN = 5000  # the "official train split": 4,000 train + 1,000 val after the 80/20 split
NUM_TEST = 1000  # the "official val split", used as test
NUM_PRETRAIN = 4000
IMAGE_SIZE = 32
_DRAW = 2 * IMAGE_SIZE  # drawn at twice the size and average-pooled, for smooth edges

# ---------------------------------------------------------------------------------------------------------------------
# Shapes. Each is a boolean function of object-centred coordinates (u right, v up), scaled so the object spans about
# [-1, 1]. Colour is random per object, so only the shape carries the class.


def _polygon(n: int, phase: float = math.pi / 2):
    def shape(u, v):
        r, t = np.hypot(u, v), np.arctan2(v, u) - phase
        sector = 2 * math.pi / n
        return r * np.cos((t % sector) - sector / 2) <= 0.85 * math.cos(sector / 2)

    return shape


def _square(u, v, half=0.8):
    return np.maximum(np.abs(u), np.abs(v)) <= half


def _disk(u, v, radius=1.0):
    return u * u + v * v <= radius * radius


def _plus(u, v):
    return ((np.abs(u) < 0.25) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.25) & (np.abs(u) < 0.95))


_S = math.sqrt(0.5)

MULTILABEL_SHAPES = {
    "disk": _disk,
    "ring": lambda u, v: _disk(u, v) & ~_disk(u, v, 0.55),
    "square": _square,
    "hollow_square": lambda u, v: _square(u, v, 0.85) & ~_square(u, v, 0.45),
    "triangle": lambda u, v: (v > -0.6) & (v < 0.95 - 1.75 * np.abs(u)),
    "plus": _plus,
    "x": lambda u, v: _plus(_S * (u - v), _S * (u + v)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "h_stripes": lambda u, v: _square(u, v, 0.85) & (np.floor((v + 1) * 2.5) % 2 == 0),
    "v_stripes": lambda u, v: _square(u, v, 0.85) & (np.floor((u + 1) * 2.5) % 2 == 0),
    "checker": lambda u, v: _square(u, v, 0.85) & ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0),
    "star": lambda u, v: np.hypot(u, v) <= 0.4 + 0.6 * np.abs(np.cos(2.5 * np.arctan2(v, u))) ** 3,
    "crescent": lambda u, v: _disk(u, v) & ~_disk(u - 0.5, v, 0.8),
    "T": lambda u, v: ((np.abs(u) < 0.9) & (v > 0.45) & (v < 0.9)) | ((np.abs(u) < 0.22) & (np.abs(v) < 0.9)),
    "half_disk": lambda u, v: _disk(u, v) & (v > -0.2),
    "ellipse": lambda u, v: u * u + (v / 0.5) ** 2 <= 1.0,
}

# Sixteen other shapes for the pretraining task: none is a multi-label class.
PRETRAIN_SHAPES = {
    "pentagon": _polygon(5),
    "hexagon": _polygon(6, 0.0),
    "arrow": lambda u, v: ((np.abs(v) < 0.2) & (u > -0.9) & (u < 0.2)) | ((u >= 0.2) & (np.abs(v) < 0.9 - 1.2 * u)),
    "heart": lambda u, v: (u * u + (v - np.sqrt(np.abs(u)) * 0.8 + 0.2) ** 2) <= 0.8,
    "L": lambda u, v: ((np.abs(u + 0.6) < 0.25) & (np.abs(v) < 0.9)) | ((np.abs(v + 0.65) < 0.25) & (np.abs(u) < 0.85)),
    "U": lambda u, v: (
        (np.abs(np.abs(u) - 0.6) < 0.22) & (np.abs(v) < 0.9) | ((np.abs(v + 0.7) < 0.2) & (np.abs(u) < 0.8))
    ),
    "H": lambda u, v: (np.abs(np.abs(u) - 0.6) < 0.22) & (np.abs(v) < 0.9) | ((np.abs(v) < 0.2) & (np.abs(u) < 0.6)),
    "Z": lambda u, v: (
        (_square(u, v, 0.85) & (np.abs(np.abs(v) - 0.65) < 0.2)) | ((np.abs(u - v) < 0.3) & (np.abs(u) < 0.8))
    ),
    "hourglass": lambda u, v: _square(u, v, 0.85) & (np.abs(v) >= np.abs(u)),
    "bowtie": lambda u, v: _square(u, v, 0.85) & (np.abs(u) >= np.abs(v)),
    "three_dots": lambda u, v: _disk(u + 0.6, v + 0.45, 0.3) | _disk(u - 0.6, v + 0.45, 0.3) | _disk(u, v - 0.55, 0.3),
    "frame_dot": lambda u, v: (_square(u, v, 0.9) & ~_square(u, v, 0.7)) | _disk(u, v, 0.3),
    "arc": lambda u, v: _disk(u, v) & ~_disk(u, v, 0.6) & (v < 0.1),
    "dumbbell": lambda u, v: (
        _disk(u + 0.6, v, 0.35) | _disk(u - 0.6, v, 0.35) | ((np.abs(v) < 0.12) & (np.abs(u) < 0.6))
    ),
    "grid": lambda u, v: _square(u, v, 0.85) & ((np.abs(u) % 0.55 < 0.16) | (np.abs(v) % 0.55 < 0.16)),
    "spiral": lambda u, v: _disk(u, v) & ((np.hypot(u, v) * 3.2 - np.arctan2(v, u) / math.pi) % 1.0 < 0.45),
}

CLASS_NAMES = tuple(MULTILABEL_SHAPES)

# Co-occurrence: five hidden scene types, each favouring five classes; base frequencies fall off with the class index.
SCENES = ((0, 2, 5, 9, 13), (1, 3, 6, 10, 14), (4, 7, 8, 11, 15), (0, 5, 8, 12, 15), (2, 6, 9, 11, 14))
_BASE_WEIGHTS = 0.6 ** (np.arange(16) / 4.0)
_SCENE_BOOST = 6.0
_NUM_OBJECTS_P = (0.2, 0.3, 0.3, 0.2)  # 1, 2, 3 or 4 distinct objects


# ---------------------------------------------------------------------------------------------------------------------
# Drawing.

_GRID = (np.arange(_DRAW) + 0.5) / _DRAW  # pixel centres in [0, 1]
_XX, _YY = np.meshgrid(_GRID, _GRID)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _background(rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (_XX - 0.5) * math.cos(angle) + (_YY - 0.5) * math.sin(angle) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return (1 - t) * c0 + t * c1


def _contrasting_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    under = _luminance(image[mask].mean(axis=0)) if mask.any() else 0.5
    for _ in range(50):
        colour = rng.uniform(0, 1, 3)
        if abs(_luminance(colour) - under) >= 0.3:
            return colour
    return np.full(3, 0.0 if under > 0.5 else 1.0)


RADIUS_RANGE = (0.17, 0.27)
MIN_CENTRE_GAP = 0.8  # objects overlap at most a little: centres at least this fraction of the radii sum apart


def _place(rng: np.random.Generator, placed: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Radius and centre of a new object, away from the ones already placed (best of 30 tries)."""
    best, best_gap = None, -np.inf
    for _ in range(30):
        radius = rng.uniform(*RADIUS_RANGE)
        cx, cy = rng.uniform(radius, 1 - radius, 2)
        gap = min((math.hypot(cx - x, cy - y) / (radius + r) for x, y, r in placed), default=np.inf)
        if gap >= MIN_CENTRE_GAP:
            return cx, cy, radius
        if gap > best_gap:
            best, best_gap = (cx, cy, radius), gap
    return best


def _draw_object(rng: np.random.Generator, image: np.ndarray, shape, placed: list) -> None:
    cx, cy, radius = _place(rng, placed)
    placed.append((cx, cy, radius))
    angle = rng.uniform(-0.3, 0.3)  # about +-17 degrees
    dx, dy = (_XX - cx) / radius, (cy - _YY) / radius
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    mask = shape(u, v)
    image[mask] = _contrasting_colour(rng, image, mask)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    for _ in range(rng.integers(0, 3)):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4)
        length = max(math.hypot(x1 - x0, y1 - y0), 1e-6)
        # distance of every pixel to the segment
        t = np.clip(((_XX - x0) * (x1 - x0) + (_YY - y0) * (y1 - y0)) / length**2, 0, 1)
        dist = np.hypot(_XX - (x0 + t * (x1 - x0)), _YY - (y0 + t * (y1 - y0)))
        image[dist < 0.6 / _DRAW] = rng.uniform(0, 1, 3)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    small = image.reshape(IMAGE_SIZE, 2, IMAGE_SIZE, 2, 3).mean(axis=(1, 3))
    small = small + rng.normal(0, 0.05, small.shape)
    return np.clip(np.round(small * 255), 0, 255).astype(np.uint8)


def draw_multilabel_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image (32x32x3 uint8) and its 0/1 label vector over the 16 classes."""
    scene = SCENES[rng.integers(len(SCENES))]
    weights = _BASE_WEIGHTS.copy()
    weights[list(scene)] *= _SCENE_BOOST
    num_objects = rng.choice(4, p=_NUM_OBJECTS_P) + 1
    classes = rng.choice(16, size=num_objects, replace=False, p=weights / weights.sum())
    image = _background(rng)
    _draw_clutter(rng, image)
    shapes = list(MULTILABEL_SHAPES.values())
    placed: list = []
    for c in classes:
        _draw_object(rng, image, shapes[c], placed)
    labels = np.zeros(16, dtype=np.float32)
    labels[classes] = 1.0
    return _finish(rng, image), labels


def draw_pretrain_image(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One single-object image of a pretraining shape and its class index."""
    label = int(rng.integers(len(PRETRAIN_SHAPES)))
    image = _background(rng)
    _draw_clutter(rng, image)
    _draw_object(rng, image, list(PRETRAIN_SHAPES.values())[label], [])
    return _finish(rng, image), label


# ---------------------------------------------------------------------------------------------------------------------
# Cache on disk.


def _manifest() -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "data_seed": DATA_SEED,
        "num_train": NUM_TRAIN,
        "num_test": NUM_TEST,
        "image_size": IMAGE_SIZE,
        "classes": list(CLASS_NAMES),
    }


def _write_split(root: Path, split: str, phase: str, count: int, rng: np.random.Generator) -> None:
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    names, labels = [], []
    for i in range(count):
        image, label = draw_multilabel_image(rng)
        name = f"{split}/{split}_{i:06d}.png"
        Image.fromarray(image).save(root / "images" / name)
        names.append(name)
        labels.append(label)
    files.save_npy_atomic(root / f"formatted_{phase}_images.npy", np.array(names))
    files.save_npy_atomic(root / f"formatted_{phase}_labels.npy", np.stack(labels))


def ensure_dataset(root: str | os.PathLike) -> Path:
    """Generate the synthetic dataset under ``root`` unless an identical one is already there.

    Layout as for the real datasets: ``images/<split>/*.png`` and ``formatted_{train,val}_{images,labels}.npy``
    (``val`` is the official held-out split, used as test). Takes about 5 s on one core.
    """
    root = Path(root)
    if _is_current(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with files.data_lock(root, f"The synthetic data folder {root} (being generated)"):
        if not _is_current(root):  # another process may have generated it while this one waited
            _generate(root)
    return root


_FORMATTED = [f"formatted_{phase}_{part}.npy" for phase in ("train", "val") for part in ("images", "labels")]


def _is_current(root: Path) -> bool:
    """The manifest says this generator made the data, and every formatted file is there."""
    try:
        manifest = json.loads((root / "synthetic.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest == _manifest() and all((root / name).exists() for name in _FORMATTED)


def _generate(root: Path) -> None:
    manifest_path = root / "synthetic.json"
    # What the data and its runs derive from the images: formatted labels (observed labels of every regime included),
    # the pretrained backbone, and the disk cache's pixels and LinearInit's features of the images.
    derived = [*root.glob("formatted_*.npy"), *(root / name for name in (_PRETRAINED_FILE, "cache", "features"))]
    if manifest_path.exists():  # this generator's (older, or interrupted): everything derived from it goes
        print(f"[synthetic] {root} holds an older or incomplete synthetic dataset; regenerating it.")
        for path in derived:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    else:  # no manifest: whatever is there is not this generator's, so it neither replaces nor deletes it
        found = sorted(p.name for p in [*derived, root / "images"] if p.exists())
        if found:
            others = ", ".join(name for name in datasets.DATASET_INFO if name != "synthetic")
            raise datasets.DataError(
                f"{root} holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''} but no synthetic.json: data "
                "that this synthetic generator did not make, which it would replace. Pass --dataset for the data that "
                f"is there ({others}), or give the synthetic data a --data_root of its own (the default is "
                "data/synthetic). A synthetic generation that an older version left unfinished looks the same: delete "
                "that folder then."
            )
    # From here on the folder is marked as this generator's, so an interrupted generation is redone, not refused.
    files.write_text_atomic(manifest_path, json.dumps({"generating": _manifest()}, indent=1))
    print(f"[synthetic] generating {NUM_TRAIN} + {NUM_TEST} images into {root} (once)...")
    rng = np.random.default_rng(DATA_SEED)
    _write_split(root, "train", "train", NUM_TRAIN, rng)
    _write_split(root, "test", "val", NUM_TEST, rng)
    files.write_text_atomic(manifest_path, json.dumps(_manifest(), indent=1))


# ---------------------------------------------------------------------------------------------------------------------
# The pretrained backbone: the analogue of ImageNet weights for the synthetic data.

_PRETRAINED_FILE = "pretrained_smallcnn.pt"
PRETRAIN_EPOCHS = 3


def pretrained_backbone_path(root: str | os.PathLike) -> Path:
    return Path(root) / _PRETRAINED_FILE


def ensure_pretrained_backbone(root: str | os.PathLike) -> Path:
    """Train (once, about 10 s) and cache the small CNN backbone on the single-object pretraining shapes."""
    path = pretrained_backbone_path(root)
    if path.exists():
        return path
    with files.data_lock(Path(root), f"The synthetic data folder {root} (backbone being pretrained)"):
        if not path.exists():  # another process may have made it while this one waited
            _pretrain(path)
    return path


def _pretrain(path: Path) -> None:
    import torch

    import models

    print(f"[synthetic] pretraining the small CNN backbone on {NUM_PRETRAIN} images of 16 other shapes (once)...")
    rng = np.random.default_rng(PRETRAIN_SEED)
    drawn = [draw_pretrain_image(rng) for _ in range(NUM_PRETRAIN)]
    images = torch.from_numpy(np.stack([d[0] for d in drawn])).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor([d[1] for d in drawn])
    inputs = loaders.to_model_input(images)

    generator = torch.Generator().manual_seed(PRETRAIN_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAIN_SEED)
        backbone = models.SmallCNN()
        backbone = backbone.to(memory_format=torch.channels_last)
        head = torch.nn.Linear(backbone.out_channels, len(PRETRAIN_SHAPES))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    backbone.train()
    for _ in range(PRETRAIN_EPOCHS):
        order = torch.randperm(len(targets), generator=generator)
        correct = 0
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            logits = head(backbone(inputs[idx]).amax(dim=(2, 3)))
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == targets[idx]).sum())
    print(f"[synthetic] pretraining accuracy in the last epoch: {correct / len(targets):.3f}")
    files.save_torch_atomic(backbone.state_dict(), path)


datasets.register_prepare("synthetic", ensure_dataset, smallcnn_weights=ensure_pretrained_backbone)
