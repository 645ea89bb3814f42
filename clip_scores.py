"""The scoring pass of the vision-language pseudo-label methods (``--loss vlpl``, ``--loss aevlp``): run once, by
``python pseudo_labels.py`` (its command line) or, for the synthetic stand-in, by the run itself.

A frozen CLIP (open_clip) scores every image of the dataset's official train split (the rows the train and val
splits are drawn from) against one text prompt per class: the whole image and AEVLP's grid of crops, each with and
without a horizontal flip. The raw cosine similarities go to one score file in the dataset's derived folder::

    python pseudo_labels.py --dataset coco --clip ViT-B-16                  # AEVLP's scorer, 4 x 4 grid
    python pseudo_labels.py --dataset coco --clip ViT-L-14-336 --grid 0     # VLPL's scorer, whole image only

Nothing a pseudo-label rule needs depends on the model being trained, so the authors' per-batch CLIP calls become
one pass per dataset and scorer; the rules themselves (``losses_vlp``) run on these scores when a run starts.
The file is ``<derived>/pseudo_labels/<scorer>_grid<G>_<images>.npy`` (float16, images x 2 flips x views x
classes; view 0 the whole image, then the crops row by row), with ``.json`` (what made it, and the pseudo-labels'
precision and recall) and ``.done.npy`` (the images finished: a killed pass resumes) beside it.

The synthetic dataset has no CLIP that knows its shapes: ``--clip standin`` writes the same file from the full labels
with stated noise (``standin_similarities``), and the runs make it themselves on first use.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import datasets
import files
import loaders

FORMAT = 1
STANDIN = "standin"
DEFAULT_TEMPLATE = "a photo of a {}."  # AEVLP's prompt: their ctx_init "a photo of a" + " " + name + "."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Both papers' code normalises CLIP's input with ImageNet's statistics, not CLIP's (AEVLP's transform, and VLPL's
# resized training tensor): kept as the default, ``--normalisation clip`` gives CLIP's own.
NORMALISATIONS = {"imagenet": (loaders.IMAGENET_MEAN, loaders.IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
CHUNK = 64  # images per write and done marker
PIP = "pip install open-clip-torch"


class ScoreError(datasets.DataError):
    """A score file that is missing, unfinished or of something else; the message says what to run or delete."""


# ---------------------------------------------------------------------------------------------------------------------
# Where the file lives and what identifies it.


def images_fingerprint(names: np.ndarray) -> str:
    """A short hash of an image list (the same as ``loaders.split_fingerprint`` of a split of these names)."""
    return hashlib.sha1(b"\n".join(str(n).encode() for n in names)).hexdigest()[:12]


def score_path(derived: Path, scorer: str, grid: int, names: np.ndarray) -> Path:
    """The score file of ``scorer`` with a ``grid`` x ``grid`` crop grid (0: the whole image only) over ``names``."""
    return Path(derived) / "pseudo_labels" / f"{scorer}_grid{grid}_{images_fingerprint(names)}.npy"


def meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def done_path(path: Path) -> Path:
    return path.with_name(path.stem + ".done.npy")


def make_command(
    dataset: str, scorer: str, grid: int, data_root: str | None = None, cache_dir: str | None = None
) -> str:
    """The one command that makes a score file."""
    cmd = f"python pseudo_labels.py --dataset {dataset} --clip {scorer} --grid {grid}"
    cmd += f" --data_root {data_root}" if data_root else ""
    return cmd + (f" --cache_dir {cache_dir}" if cache_dir else "")


def read_meta(path: Path) -> dict | None:
    try:
        return json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return None


def open_scores(path: Path, num_images: int, num_classes: int, grid: int, fix: str) -> tuple[np.ndarray, dict]:
    """The finished score file (memory-mapped) and its record; ScoreError naming ``fix`` when it is missing,
    unfinished or does not match the images, classes or grid."""
    meta = read_meta(path)
    if not path.exists() or meta is None:
        raise ScoreError(f"No pseudo-label score file {path}. Make it once with: {fix}")
    done = _read_done(path, num_images)
    if done is None or not done.all():
        count = 0 if done is None else int(done.sum())
        raise ScoreError(
            f"The score file {path} is unfinished ({count} of {num_images} images scored). Run again "
            f"to finish it: {fix}"
        )
    expected = (num_images, 2, 1 + grid * grid, num_classes)
    try:
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ScoreError(f"The score file {path} cannot be read ({err}). Delete it and make it again: {fix}") from err
    if scores.shape != expected or meta.get("num_classes") != num_classes or meta.get("grid") != grid:
        raise ScoreError(
            f"The score file {path} holds {scores.shape}, not {expected} (images, flips, views, "
            f"classes). Delete it and make it again: {fix}"
        )
    return scores, meta


def _read_done(path: Path, num_images: int) -> np.ndarray | None:
    try:
        done = np.load(done_path(path), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return done if done.shape == (num_images,) and done.dtype == bool else None


_IDENTITY = (
    "format",
    "scorer",
    "weights",
    "prompts",
    "grid",
    "size",
    "normalisation",
    "images",
    "num_images",
    "num_classes",
)


def identity(meta: dict) -> str:
    """A short hash of what made a score file (scorer, weights, prompts, grid, size, images): runs record it."""
    return hashlib.sha1(json.dumps([meta.get(k) for k in _IDENTITY]).encode()).hexdigest()[:16]


def _mismatch(old: dict, new: dict) -> str | None:
    differ = [k for k in _IDENTITY if old.get(k) != new.get(k)]
    return None if not differ else ", ".join(differ)


# ---------------------------------------------------------------------------------------------------------------------
# Views: the whole image and the grid of crops, unflipped and flipped.


def crop_boxes(width: int, height: int, grid: int) -> list[tuple[int, int, int, int]]:
    """AEVLP's grid: ``grid`` x ``grid`` tiles of (width // grid) x (height // grid) pixels, row by row, without
    overlap (their offsets are drawn and then set to 0)."""
    tw, th = width // grid, height // grid
    return [
        (x * tw, y * th, min(width, (x + 1) * tw), min(height, (y + 1) * th)) for y in range(grid) for x in range(grid)
    ]


def image_views(image: Image.Image, grid: int, size: int) -> np.ndarray:
    """uint8 2 x V x size x size x 3: the whole image and its crops, each resized (squashed, PIL bilinear, as
    torchvision's ``Resize((size, size))``); [1] is the horizontally flipped image's views, in its own grid order."""
    image = loaders.to_rgb(image)
    crops = [image] + ([image.crop(box) for box in crop_boxes(*image.size, grid)] if grid else [])
    plain = np.stack([np.asarray(c.resize((size, size), Image.BILINEAR)) for c in crops])
    flipped = plain[:, :, ::-1]  # each view mirrored; the flipped image's tile (r, c) is the mirror of tile (r, G-1-c)
    if grid:
        order = [0] + [1 + r * grid + (grid - 1 - c) for r in range(grid) for c in range(grid)]
        flipped = flipped[order]
    return np.stack([plain, flipped])


class ViewsDataset(torch.utils.data.Dataset):
    """(views of image ``rows[i]``, its row) for the images still to score."""

    def __init__(self, image_dir: str, names: np.ndarray, rows: np.ndarray, grid: int, size: int) -> None:
        self.image_dir, self.names, self.rows, self.grid, self.size = image_dir, names, rows, grid, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[i])
        name = self.names[row]
        path = Path(self.image_dir) / (name.decode() if isinstance(name, bytes) else str(name))
        with Image.open(path) as image:
            return torch.from_numpy(image_views(image, self.grid, self.size)), row


# ---------------------------------------------------------------------------------------------------------------------
# The CLIP scorer.


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ScoreError(f"A CLIP scorer needs open_clip, an optional extra: {PIP}") from err
    return open_clip


def load_clip(name: str, weights: str | None, device: torch.device, weights_file: str | None = None):
    """A frozen open_clip model in eval mode, with its tokenizer. ``weights``: an open_clip pretrained tag (e.g.
    ``openai``, the authors' weights), or None for random weights (tests); ``weights_file``: a local checkpoint
    instead (offline). OpenAI's checkpoints use QuickGELU, which open_clip sets for the ``openai`` tag; a local file
    is taken to be OpenAI's too unless ``weights`` says otherwise."""
    open_clip = import_open_clip()
    if name not in open_clip.list_models():
        raise ScoreError(
            f"open_clip has no model {name!r}; e.g. ViT-B-16 (AEVLP) or ViT-L-14-336 (VLPL). "
            "open_clip.list_models() lists them."
        )
    try:
        if weights_file is not None:
            model = open_clip.create_model(name, pretrained=weights_file, force_quick_gelu=weights in (None, "openai"))
        else:
            model = open_clip.create_model(name, pretrained=weights)
    except Exception as err:  # a download without network, a damaged file: the message names what to do
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ScoreError(
            f"Could not load the {weights_file or weights} weights of {name} ({why}). Without network, "
            f"download the checkpoint elsewhere (open_clip tags for {name}: {tags}; OpenAI's file is "
            f"the one their CLIP package fetches, e.g. ViT-B-16.pt) and pass it with --clip_weights "
            "FILE."
        ) from err
    model = model.to(device).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


@torch.inference_mode()
def text_features(model, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The prompts' unit-norm text embeddings (C x D, fp32)."""
    features = model.encode_text(tokenizer(prompts).to(device)).float()
    return features / features.norm(dim=-1, keepdim=True)


def view_batches(views: torch.Tensor, batch: int):
    """The B x 2 x V x S x S x 3 uint8 views of a loader batch, flattened, in pieces of ``batch`` crops."""
    flat = views.flatten(0, 2)
    yield from flat.split(batch)


@torch.inference_mode()
def similarities(
    model, texts: torch.Tensor, crops: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, amp
) -> torch.Tensor:
    """Cosine similarities (N x C, fp32) of uint8 N x S x S x 3 crops (on the model's device) to the texts."""
    x = crops.permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)
    with amp():
        features = model.encode_image(x)
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)) @ texts.T


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic stand-in: no CLIP knows the synthetic shapes.

STANDIN_SEED = 2024
# Similarities are 0.2 + 0.01 * (signal + N(0, 1)): at both methods' temperature 0.01 a CLIP logit is 20 + signal +
# noise. The whole image carries STANDIN_WHOLE for each class it "shows"; each such class shows in 1 to 4 random crops
# of the grid, where it carries STANDIN_CROP; the flipped views draw their own noise. An image shows its present
# classes and, as CLIP confuses similar things, each absent class with probability STANDIN_CONFUSION: the confusions
# are what makes a pseudo-label wrong (Gaussian noise alone almost never does at this temperature).
STANDIN_BASE, STANDIN_SCALE, STANDIN_WHOLE, STANDIN_CROP, STANDIN_CONFUSION = 0.2, 0.01, 3.0, 4.0, 0.03


def standin_similarities(labels: np.ndarray, grid: int, seed: int = STANDIN_SEED) -> np.ndarray:
    """The stand-in scorer's float16 N x 2 x V x C similarities from the full labels (``labels``, N x C 0/1)."""
    rng = np.random.default_rng(seed)
    n, c = labels.shape
    views = 1 + grid * grid
    present = (labels > 0) | (rng.random((n, c)) < STANDIN_CONFUSION)
    signal = np.zeros((n, 2, views, c), dtype=np.float32)
    signal[:, :, 0] = STANDIN_WHOLE * present[:, None, :]
    if grid:
        shown = rng.integers(1, 5, size=(n, c))
        order = rng.random((n, grid * grid, c)).argsort(axis=1).argsort(axis=1)  # each class's random crop ranks
        in_crop = (order < shown[:, None, :]) & present[:, None, :]
        signal[:, :, 1:] = STANDIN_CROP * in_crop[:, None]
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    return (STANDIN_BASE + STANDIN_SCALE * (signal + noise)).astype(np.float16)


# ---------------------------------------------------------------------------------------------------------------------
# The pass.


def class_prompts(dataset: str, root: Path, template: str, prompts_file: str | None) -> list[str]:
    """One prompt per class: the lines of ``prompts_file``, or ``template`` filled with each class's name (from the
    raw files; ``_`` and CUB's ``::`` read as spaces)."""
    num_classes = datasets.DATASET_INFO[dataset].num_classes
    if prompts_file is not None:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(prompts) != num_classes:
            raise ScoreError(
                f"{prompts_file} holds {len(prompts)} prompts; {dataset} has {num_classes} classes (one "
                "prompt a line, in column order)."
            )
        return prompts
    names = datasets.class_names(dataset, root)
    if names and names[0] == "class 0":
        raise ScoreError(
            f"The class names of {dataset} are not in {root} (the raw annotation files give them), so "
            "no text prompt can be made. Put the raw files there, or give one prompt per class with "
            "--prompts FILE."
        )
    return [template.format(n.replace("::", " ").replace("_", " ").strip()) for n in names]


def write_scores(path: Path, meta: dict, fill, todo: np.ndarray, shape: tuple, on_chunk=None) -> None:
    """Create or continue the score file: ``fill(rows) -> (rows, float array)`` yields scored chunks of the images in
    ``todo``; each is written, flushed and marked done before the next (a killed pass resumes from the last mark)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(path, shape[0])
    if not path.exists() or done is None:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
        done = np.zeros(shape[0], dtype=bool)
        files.save_npy_atomic(done_path(path), done)
    files.write_text_atomic(meta_path(path), json.dumps(meta, indent=1))
    scores = np.load(path, mmap_mode="r+")
    with tqdm(total=shape[0], initial=int(done.sum()), desc=f"scoring {path.name}", unit="img") as bar:
        for rows, values in fill(todo[~done[todo]]):
            scores[rows] = values
            scores.flush()
            done[rows] = True
            files.save_npy_atomic(done_path(path), done)
            bar.update(len(rows))
            if on_chunk is not None:
                on_chunk(int(done.sum()))
    del scores


def standin_fill(labels: np.ndarray, grid: int):
    values = standin_similarities(labels, grid)

    def fill(rows: np.ndarray):
        for start in range(0, len(rows), CHUNK * 16):
            part = rows[start : start + CHUNK * 16]
            yield part, values[part]

    return fill


def clip_fill(model, texts, image_dir, names, grid, size, device, batch, workers, normalisation):
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in NORMALISATIONS[normalisation])
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else _no_amp

    def fill(rows: np.ndarray):
        loader = torch.utils.data.DataLoader(
            ViewsDataset(image_dir, names, rows, grid, size),
            batch_size=CHUNK,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        for views, chunk_rows in loader:
            views = views.to(device, non_blocking=True)
            sims = torch.cat([similarities(model, texts, part, mean, std, amp) for part in view_batches(views, batch)])
            yield chunk_rows.numpy(), sims.view(*views.shape[:3], -1).cpu().numpy()

    return fill


def _no_amp():
    import contextlib

    return contextlib.nullcontext()


def quality(scores: np.ndarray, labels: np.ndarray, observed: np.ndarray, rule) -> dict:
    """Precision and recall of the positive pseudo-labels ``rule(scores, observed)`` makes on the unobserved entries
    (unflipped views), against the full labels; and the share of negative pseudo-labels that are truly negative."""
    tp = fp = fn = neg = neg_true = 0
    for start in range(0, len(labels), 4096):
        part = slice(start, start + 4096)
        obs = torch.from_numpy(np.asarray(observed[part]))
        pl = rule(torch.from_numpy(np.asarray(scores[part, 0], dtype=np.float32)), obs).numpy()
        truth, unobserved = labels[part] > 0, obs.numpy() == 0
        tp += int(((pl == 1) & truth & unobserved).sum())
        fp += int(((pl == 1) & ~truth & unobserved).sum())
        fn += int(((pl != 1) & truth & unobserved).sum())
        neg += int(((pl == -1) & unobserved).sum())
        neg_true += int(((pl == -1) & ~truth & unobserved).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "positives_per_image": (tp + fp) / len(labels),
        "negative_precision": neg_true / neg if neg else None,
    }


def ensure_scores(dataset: str, root: Path, derived: Path, scorer: str, grid: int, **options) -> Path:
    """Make (or finish) the score file of ``scorer`` over ``dataset``'s official train split, under the data root's
    lock, and record the quality of the pseudo-labels that ``rules`` (``{method: rule}``, as
    ``methods_vlp.pseudo_label_rules`` gives them) make from it. Returns its path; a finished matching file is reused
    as it is. A file of the same name made otherwise (weights, prompts, size, normalisation) is refused unless
    ``overwrite``."""
    data = datasets.load_formatted(dataset, root, derived)["train"]
    names, labels, observed = data["images"], data["labels"], data["labels_obs"]
    info = datasets.DATASET_INFO[dataset]
    path = score_path(derived, scorer, grid, names)
    with files.data_lock(derived, f"The data folder {derived} (pseudo-label scores being written)"):
        return _ensure_locked(dataset, root, path, scorer, grid, names, labels, observed, info, **options)


def _ensure_locked(
    dataset,
    root,
    path,
    scorer,
    grid,
    names,
    labels,
    observed,
    info,
    *,
    weights=None,
    weights_file=None,
    template=DEFAULT_TEMPLATE,
    prompts_file=None,
    size=None,
    normalisation="imagenet",
    device="cpu",
    batch=256,
    workers=0,
    overwrite=False,
    on_chunk=None,
    rules=None,
    quiet=False,
) -> Path:
    device = torch.device(device)
    views = 1 + grid * grid
    if scorer == STANDIN:
        prompts, size = [], 0
        weights_id = (
            f"full labels + noise: whole {STANDIN_WHOLE}, crop {STANDIN_CROP}, confusion "
            f"{STANDIN_CONFUSION}, seed {STANDIN_SEED}"
        )
        model = texts = None
    else:
        prompts = class_prompts(dataset, root, template, prompts_file)
        weights_id = _weights_id(weights, weights_file)
        model, tokenizer = load_clip(scorer, weights, device, weights_file)
        size = size or _image_size(model)
        texts = text_features(model, tokenizer, prompts, device)
    meta = {
        "format": FORMAT,
        "scorer": scorer,
        "weights": weights_id,
        "prompts": prompts,
        "grid": grid,
        "size": size,
        "normalisation": normalisation if scorer != STANDIN else None,
        "images": images_fingerprint(names),
        "num_images": len(names),
        "num_classes": info.num_classes,
    }
    old = read_meta(path)
    if path.exists() and old is not None:
        differ = _mismatch(old, meta)
        if differ and not overwrite:
            raise ScoreError(
                f"The score file {path} was made with another {differ}. Delete it (or pass --overwrite) "
                "to score again with these settings."
            )
        if differ or _read_done(path, len(names)) is None:
            path.unlink(missing_ok=True)
        elif old.get("complete"):
            if not quiet:
                print(f"pseudo-label scores: {path} is complete; reused")
            return path
    elif path.exists():
        path.unlink()
    started = time.time()
    shape = (len(names), 2, views, info.num_classes)
    if scorer == STANDIN:
        fill = standin_fill(labels, grid)
    else:
        image_dir = str(Path(root) / info.image_dir)
        fill = clip_fill(model, texts, image_dir, names, grid, size, device, batch, workers, normalisation)
    write_scores(path, meta, fill, np.arange(len(names)), shape, on_chunk)
    scores = np.load(path, mmap_mode="r")
    meta["quality"] = {name: quality(scores, labels, observed, rule) for name, rule in (rules or {}).items()}
    meta.update(complete=True, seconds=round(time.time() - started, 1))
    meta["bytes_per_image_and_class"] = 2 * 2 * views
    files.write_text_atomic(meta_path(path), json.dumps(meta, indent=1))
    _print_quality(path, meta)
    return path


def _print_quality(path: Path, meta: dict) -> None:
    print(f"pseudo-label scores: {path} ({meta['bytes_per_image_and_class']} bytes per image and class)")
    for name, q in meta["quality"].items():
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        print(
            f"  {name} rule, this dataset's preset, unflipped: positive pseudo-labels precision {fmt(q['precision'])}"
            f", recall {fmt(q['recall'])} ({q['positives_per_image']:.2f} per image); negatives truly negative "
            f"{fmt(q['negative_precision'])}"
        )


def _weights_id(weights: str | None, weights_file: str | None) -> str:
    if weights_file is None:
        return str(weights) if weights else "random (no weights)"
    digest = hashlib.sha1()
    with open(weights_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return f"file {Path(weights_file).name} sha1 {digest.hexdigest()[:16]}"


def _image_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
