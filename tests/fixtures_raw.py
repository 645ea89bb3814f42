"""Tiny fixture trees in each dataset's real raw on-disk layout, with real (tiny) JPEG images where the formatted
names point. The raw content lives here; the expected formatted values are written by hand in test_formats.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (20, 16)) -> None:
    """A tiny real JPEG (20 x 16 by default), its pixels a function of ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG")


# ------------------------------------------------------------------------------------------------------------ pascal
# Per split: (image id, {class: flag}) in the order the ids appear in every <class>_<split>.txt; every class not named
# has flag -1 for that image (in VOC every image of a split is listed in every class file of that split).
PASCAL = {
    "train": [
        ("2008_000015", {"person": 1, "dog": 1}),  # two positives
        ("2008_000008", {"horse": 1, "person": 0}),  # a positive and a difficult
        ("2010_000002", {"aeroplane": 1}),
        ("2008_000019", {"cat": 0}),  # only difficult: not kept
        ("2007_000032", {"tvmonitor": 1, "chair": 0}),
        ("2009_000001", {"bird": 1}),
    ],
    "val": [
        ("2008_000009", {"sheep": 1}),
        ("2007_000005", {"bicycle": 1, "car": 1, "diningtable": 0}),
        ("2008_000030", {}),  # only -1: not kept
        ("2011_000001", {"bottle": 0, "sofa": 1}),
    ],
}


def pascal_line(image_id: str, flag: int) -> str:
    # The real files: "2008_000008 -1", "2008_000015  1", "2008_000019  0" (two spaces before 1 and 0).
    return f"{image_id} -1" if flag == -1 else f"{image_id}  {flag}"


def make_pascal(root: Path) -> Path:
    main = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, images in PASCAL.items():
        for name in VOC_CLASSES:
            lines = [pascal_line(image_id, flags.get(name, -1)) for image_id, flags in images]
            (main / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
        (main / f"{split}.txt").write_text("\n".join(image_id for image_id, _ in images) + "\n")
    for seed, (image_id, _) in enumerate(PASCAL["train"] + PASCAL["val"]):
        write_jpeg(root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg", seed)
    return root


# -------------------------------------------------------------------------------------------------------------- coco
# The 80 real COCO 2014 category ids (1..90 with gaps), ascending as in the real files.
COCO_IDS_80 = [
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
]  # fmt: skip
COCO_IDS_SMALL = [7, 1, 90, 3]  # gaps and not ascending
# All 80 real ids, listed in another order than ascending: COCO_IDS_SMALL first (columns 0-3), then the rest.
COCO_IDS_UNORDERED = COCO_IDS_SMALL + [c for c in COCO_IDS_80 if c not in COCO_IDS_SMALL]
# (image ids listed in "images", annotations as (image_id, category_id, iscrowd)); annotations deliberately unsorted.
COCO = {
    "train": (
        [9, 10, 100, 25, 3, 7],  # 7 has no annotation
        [(10, 1, 0), (9, 7, 0), (100, 3, 1), (10, 90, 0), (3, 7, 0), (25, 90, 0), (10, 1, 0), (3, 1, 0)],
    ),
    "val": (
        [42, 5, 1000, 8],  # 8 has no annotation
        [(5, 90, 1), (42, 3, 0), (1000, 1, 0), (5, 7, 0)],
    ),
}


def make_coco(root: Path, category_ids: list[int] = COCO_IDS_UNORDERED) -> Path:
    (root / "annotations").mkdir(parents=True)
    categories = [{"supercategory": "thing", "id": c, "name": f"category{c}"} for c in category_ids]
    seed = 0
    for split, (image_ids, image_annotations) in COCO.items():
        images = []
        for image_id in image_ids:
            file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": file_name, "width": 20, "height": 16})
            write_jpeg(root / f"{split}2014" / file_name, seed)
            seed += 1
        anns = [
            {"id": 1000 + k, "image_id": i, "category_id": c, "iscrowd": crowd, "area": 10.0, "bbox": [0, 0, 4, 4]}
            for k, (i, c, crowd) in enumerate(image_annotations)
        ]
        data = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root


# --------------------------------------------------------------------------------------------------------------- cub
CUB_IMAGES = [  # images.txt, in file order (ids not ascending)
    (3, "001.Black_footed_Albatross/Black_Footed_Albatross_0003_796136.jpg"),
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg"),
    (2, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"),
    (7, "200.Common_Yellowthroat/Common_Yellowthroat_0007_190.jpg"),
    (5, "014.Indigo_Bunting/Indigo_Bunting_0005_12.jpg"),
    (4, "014.Indigo_Bunting/Indigo_Bunting_0004_11.jpg"),
    (6, "200.Common_Yellowthroat/Common_Yellowthroat_0006_10.jpg"),
]
CUB_IS_TRAIN = {1: 1, 2: 0, 3: 1, 4: 1, 5: 0, 6: 1, 7: 1}
CUB_PRESENT = {1: {1, 312}, 2: {5}, 3: {2, 3, 150}, 4: set(), 5: {311, 312}, 6: {100}, 7: {1, 2}}  # 1-based attributes
# Lines with extra fields (as some lines of the real file): only the first three fields count.
CUB_EXTRA_FIELDS = {(2, 5): "2 5 1 3 0 12.5", (4, 7): "4 7 0 2 0 8.25", (6, 100): "6 100 1 4 0 3.1 extra"}


def make_cub(root: Path) -> Path:
    cub = root / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    (cub / "images.txt").write_text("".join(f"{i} {path}\n" for i, path in CUB_IMAGES))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, t in sorted(CUB_IS_TRAIN.items())))
    lines = []
    for image_id in sorted(CUB_PRESENT):
        for attribute in range(1, 313):
            present = int(attribute in CUB_PRESENT[image_id])
            certainty = 1 + (image_id + attribute) % 4
            default = f"{image_id} {attribute} {present} {certainty} {10 + attribute % 7}.{attribute % 10}{image_id}00"
            lines.append(CUB_EXTRA_FIELDS.get((image_id, attribute), default))
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    for image_id, path in CUB_IMAGES:
        write_jpeg(cub / "images" / path, image_id)
    return root


# ----------------------------------------------------------------------------------------------------------- nuswide
NUSWIDE_TRAIN_NAMES = [f"actor/{i:04d}_21244941{i:02d}.jpg" for i in range(10)]
NUSWIDE_VAL_NAMES = [f"zebra/{i:04d}_33300011{i:02d}.jpg" for i in range(3)]
NUSWIDE_NO_POSITIVE = {"train": (3, 5), "val": (1,)}  # rows without any positive


def nuswide_labels(phase: str) -> np.ndarray:
    n = len(NUSWIDE_TRAIN_NAMES if phase == "train" else NUSWIDE_VAL_NAMES)
    labels = np.zeros((n, 81), dtype=np.float64)
    for row in range(n):
        if row not in NUSWIDE_NO_POSITIVE[phase]:
            labels[row, [row % 81, (7 * row + 40) % 81]] = 1.0
    return labels


def make_nuswide(root: Path, images: bool = True) -> Path:
    """The formatted files as Cole et al. release them (NUS-WIDE has no raw form here), and the images."""
    root.mkdir(parents=True, exist_ok=True)
    for phase, names in (("train", NUSWIDE_TRAIN_NAMES), ("val", NUSWIDE_VAL_NAMES)):
        np.save(root / f"formatted_{phase}_images.npy", np.array(names))
        np.save(root / f"formatted_{phase}_labels.npy", nuswide_labels(phase))
        if images:
            for seed, name in enumerate(names):
                write_jpeg(root / "Flickr" / name, seed)
    return root


# -------------------------------------------------------------------------------------------------------- openimages
OI_MIDS_10 = [f"/m/0{c}" for c in "abcdefghij"]
OI_HEADER = "ImageID,Source,LabelName,Confidence"
OI_CSV = {  # folder -> lines after the header, in file order (not sorted by ImageID)
    "train": [
        "00000c3b5b7a8c8e,verification,/m/0d,0",
        "000002b66c9c498e,verification,/m/0a,1",
        "00000c3b5b7a8c8e,verification,/m/0c,1",
        "ffff000000000000,verification,/m/0j,0",
        "000002b66c9c498e,verification,/m/0b,0",
        "000002b66c9c498e,human,/m/zz,1",  # not a trainable class: ignored
        "0000aa0000000001,verification,/m/zz,1",  # this image has no trainable label: not a row
        "00000c3b5b7a8c8e,human,/m/0d,1",  # the same (image, class) annotated 0 above and 1 here
        "0123456789abcdef,verification,/m/0e,1",
        "a1b2c3d4e5f60718,verification,/m/0i,1",
        "0123456789abcdef,verification,/m/0a,0",
        "000000000000000a,verification,/m/0a,1",
        "a1b2c3d4e5f60718,human,/m/0b,1",
    ],
    "validation": [
        "0000000000000a01,verification,/m/0j,1",
        "00000000000000b1,verification,/m/0a,1",
        "00000000000000c2,verification,/m/0c,1",
        "0000000000000a01,verification,/m/0b,1",
        "00000000000000b1,verification,/m/0c,0",
    ],
    "test": [
        "1000000000000000,verification,/m/0b,1",
        "0000000000000001,verification,/m/0f,1",
        "abcdef0123456789,verification,/m/zz,0",  # no trainable label: not a row
        "1000000000000000,verification,/m/0a,0",
        "0000000000000001,verification,/m/0a,1",
        "0000000000000001,verification,/m/0e,0",
    ],
}
OI_IMAGE_DIRS = {"train": "images_train", "validation": "images_val", "test": "images_test"}


def openimages_mids(num_classes: int) -> list[str]:
    """The 10 hand-named MIDs first, then made-up ones up to ``num_classes`` (``/m/x0010`` ...)."""
    return OI_MIDS_10 + [f"/m/x{i:04d}" for i in range(10, num_classes)]


def make_openimages(root: Path, num_classes: int = 5000, extra: dict[str, list[str]] | None = None) -> Path:
    base = root / "2017_11"
    base.mkdir(parents=True)
    (base / "classes-trainable.txt").write_text("\n".join(openimages_mids(num_classes)) + "\n")
    seed = 0
    for folder, lines in OI_CSV.items():
        lines = lines + (extra or {}).get(folder, [])
        (base / folder).mkdir()
        (base / folder / "annotations-human.csv").write_text("\n".join([OI_HEADER, *lines]) + "\n")
        for image_id in sorted({line.split(",")[0] for line in lines}):
            write_jpeg(root / OI_IMAGE_DIRS[folder] / f"{image_id}.jpg", seed)
            seed += 1
    return root
