"""Raw official annotations -> formatted files: each dataset's formatter, with the official tools' rows, order,
columns, names and dtypes (Cole et al.'s formatting scripts, which the LL authors' release uses), and the class names
read from the raw files.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from label_rules import DataError, SparseLabels

COCO_NUM_CLASSES = 80
CUB_NUM_ATTRIBUTES = 312
OPENIMAGES_NUM_CLASSES = 5000
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


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
            for image_id, flag in parsed_fields(main / f"{name}_{phase}.txt", 2, lambda f: (f[0], _voc_flag(f[-1]))):
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
        raise DataError(
            f"{path} is not valid JSON ({err}): it is incomplete or damaged (an interrupted download?). {fix}"
        ) from None
    problem = None
    not_lists = (
        []
        if not isinstance(data, dict)
        else [key for key in ("annotations", "images", "categories") if key in data and not isinstance(data[key], list)]
    )
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
            raise DataError(
                f"{images_path} lists the image id {image_id} twice (lines {line_of[image_id]} and "
                f"{number}): each image has its own id. Use the official CUB_200_2011 files "
                "(data/cub/README.md)."
            )
        line_of[image_id] = number
        images.append((image_id, name))
    image_row = {image_id: i for i, (image_id, _) in enumerate(images)}
    is_train = dict(parsed_fields(cub / "train_test_split.txt", 2, lambda f: (int(f[0]), int(f[1]) == 1)))
    labels = np.full((len(images), CUB_NUM_ATTRIBUTES), -1, dtype=np.int64)
    path = cub / "attributes" / "image_attribute_labels.txt"
    for number, (image_id, attribute_id, is_present) in _parsed_lines(path, 3, lambda f: tuple(map(int, f[:3]))):
        if image_id not in image_row or not 1 <= attribute_id <= CUB_NUM_ATTRIBUTES or is_present not in (0, 1):
            raise DataError(
                f"{path}: the line '{image_id} {attribute_id} {is_present} ...' names an image not in "
                f"images.txt, an attribute outside 1..{CUB_NUM_ATTRIBUTES} or a value other than 0/1. Use "
                "the official CUB_200_2011 files (data/cub/README.md)."
            )
        row = image_row[image_id]
        if labels[row, attribute_id - 1] == 1 - is_present:  # a repeated line that agrees changes nothing
            raise DataError(
                f"{path}: line {number} gives image {image_id}, attribute {attribute_id} the value "
                f"{is_present}, and an earlier line gave it {1 - is_present}. Use the official "
                "CUB_200_2011 files (data/cub/README.md)."
            )
        labels[row, attribute_id - 1] = is_present
    if (labels < 0).any():
        row, col = np.argwhere(labels < 0)[0]
        raise DataError(f"image_attribute_labels.txt has no line for image {images[row][0]}, attribute {col + 1}.")
    unsplit = [image_id for image_id, _ in images if image_id not in is_train]
    if unsplit:
        raise DataError(
            f"{cub / 'train_test_split.txt'} has no line for image {unsplit[0]} ({len(unsplit)} images "
            "missing). Use the official CUB_200_2011 files (data/cub/README.md)."
        )
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
        raise DataError(
            f"{classes_path} lists {len(classes)} classes; the 2017_11 release (V3) has "
            f"{OPENIMAGES_NUM_CLASSES}. Use that release's file."
        )
    line_of: dict[str, int] = {}
    for number, mid in listed:
        if mid in line_of:  # one of the two columns would get no label
            raise DataError(
                f"{classes_path} lists the class {mid} twice (lines {line_of[mid]} and {number}); the "
                f"2017_11 release (V3) lists each of its {OPENIMAGES_NUM_CLASSES} classes once. Use that "
                "release's file (data/openimages/README.md)."
            )
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
                raise DataError(
                    f"{path}, line {number}: Confidence {parts[i_conf].strip().decode(errors='replace')!r} "
                    "is not a probability in [0, 1]: "
                    "the file is damaged, or not the official one. Download it again "
                    "(data/openimages/README.md)."
                )
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


def parsed_fields(path: Path, count: int, parse: Callable[[list[str]], object]) -> Iterator:
    """``parse(fields)`` of each non-blank line's whitespace-separated fields; a line with fewer than ``count`` fields,
    or one ``parse`` fails on (ValueError), is a DataError naming the file and the line."""
    return (value for _, value in _parsed_lines(path, count, parse))


def _parsed_lines(path: Path, count: int, parse: Callable[[list[str]], object], maxsplit: int = -1) -> Iterator:
    """``(line number, parse(fields))`` as ``parsed_fields``; with ``maxsplit``, the line is split that many times at
    most (the last field is the rest of the line, its inner spaces kept)."""
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


def coco_class_names(root: Path) -> list[str]:
    path = root / "annotations" / "instances_val2014.json"
    if not path.exists():
        return []
    try:
        with open(path) as f:
            return [c["name"] for c in json.load(f)["categories"]]
    except (ValueError, KeyError, TypeError):  # not the COCO file: the names stay "class <i>"
        return []


def listed_names(file: str, part: int | None = None) -> Callable[[Path], list[str]]:
    def read(root: Path) -> list[str]:
        path = root / file
        if not path.exists():
            return []
        lines = [line.strip() for line in _read_lines(path) if line.strip()]
        return [line.split(maxsplit=1)[part] if part is not None else line for line in lines]

    return read


def openimages_class_names(root: Path) -> list[str]:
    descriptions = root / "2017_11" / "class-descriptions.csv"
    if not descriptions.exists():
        return []
    described = dict(line.split(",", 1) for line in _read_lines(descriptions) if "," in line)
    mids = [line.strip() for line in _read_lines(root / "2017_11" / "classes-trainable.txt") if line.strip()]
    return [described.get(mid, mid).strip().strip('"') for mid in mids]


def synthetic_class_names(root: Path) -> list[str]:
    """The generator writes its class names into ``synthetic.json`` beside the images."""
    try:
        return list(json.loads((root / "synthetic.json").read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
