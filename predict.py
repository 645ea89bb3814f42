"""Score new images with a trained run: the labels its best-val model predicts, with their probabilities.

    python predict.py results/<run> photo.jpg holiday_photos/ [--top_k 3 | --threshold 0.5] [--format csv|json]
                      [--output predictions.csv] [--batch_size 64] [--device auto|cpu|cuda] [--num_workers 4]

Folders are searched recursively for image files (``.jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm``, any
case); a file named on the command line is scored whatever its extension. Each image is preprocessed exactly as the
run's test images were (PIL bilinear resize to the run's square size, no crop, ImageNet normalisation) and scored by
``bestmodel.pt`` (the best-val epoch). Per image it prints the labels with probability >= the threshold (0.5 unless
given), highest first; with ``--top_k K`` the K most probable labels instead (with both, at most K labels, each at
least the threshold). Unreadable files among readable ones are skipped and counted on stderr. See docs/predict.md.

``load_run`` (a run folder -> its config, best model and class names) is shared with ``cam.py``.
"""

from __future__ import annotations

import tool_io  # first: notes a Ctrl-C while torch imports (see tool_io)

# isort: split
import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import config
import config_rules
import datasets
import loaders
import models
import resize
from files import write_atomic

INTERRUPTED = "Interrupted (Ctrl-C): nothing was written."
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class PredictError(Exception):
    """A problem with the command's inputs (paths, device) that the user can fix; the message says what and how."""


# ---------------------------------------------------------------------------------------------------------------------
# A run folder -> config, model, class names (shared with cam.py).


@dataclass
class Run:
    path: Path
    cfg: config.Config
    model: models.MultiLabelClassifier  # on the CPU, in eval mode
    class_names: list[str]
    epoch: int | None = None  # the best-val epoch bestmodel.pt was saved at, when it says


def config_from_saved(values: dict) -> config.Config:
    """A ``Config`` from a saved ``config.json``: a field an older version did not write takes the ``Config`` field's
    default (``config.config_defaults``; for a field without one, the command line's default for the run's dataset);
    unknown keys are ignored. Raises ``ValueError`` when the values break a rule of ``config.validate``."""
    defaults = config.config_defaults()
    missing = [name for name in config_field_names() if name not in values and name not in defaults]
    if missing:  # a protocol field without a default (arch, image_size, ...): the dataset's command-line default
        dataset = values.get("dataset") if values.get("dataset") in config.dataset_names() else "synthetic"
        parsed = config.config_from_args(config.get_args_parser().parse_args(["--dataset", dataset]))
        defaults = {**defaults, **{name: getattr(parsed, name) for name in missing}}
    merged = {name: values[name] if name in values else defaults[name] for name in config_field_names()}
    merged = {name: tuple(v) if isinstance(v, list) else v for name, v in merged.items()}  # config.json's lists
    return config.Config(**merged)


def config_field_names() -> list[str]:
    config.config_defaults()  # brings ``config.Config`` up to date with the method registry
    return [field.name for field in dataclasses.fields(config.Config)]


def _read_config(run_dir: Path, best: dict) -> config.Config:
    path = source = run_dir / "config.json"
    if path.exists():
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise checkpoint.RunFolderError(
                f"{path} cannot be read ({err}). Restore it from the config saved in bestmodel.pt, or train again."
            ) from None
    elif isinstance(best.get("config"), dict):  # bestmodel.pt carries the run's config too
        values, source = best["config"], f"the config saved in {run_dir / 'bestmodel.pt'}"
    else:
        raise checkpoint.RunFolderError(f"{run_dir} has no config.json; point at a run folder written by main.py.")
    if not isinstance(values, dict):
        raise checkpoint.RunFolderError(f"{path} does not hold a JSON object; restore it or train the run again.")
    try:
        return config_from_saved(values)
    except (ValueError, TypeError) as err:
        raise checkpoint.RunFolderError(f"{source} is not a valid config ({err}); restore it or train again.") from None


def load_run(run_dir: str | os.PathLike) -> Run:
    """The run's config, its best-val model (built without any download: the checkpoint holds every weight) and its
    class names. Raises ``RunFolderError`` with a message saying what to do when the folder, its config or its
    ``bestmodel.pt`` is missing, unreadable or does not fit the config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise checkpoint.RunFolderError(f"The run folder {run_dir} {what}; point at a run folder of main.py.")
    best_path = run_dir / "bestmodel.pt"
    if not best_path.exists():
        raise checkpoint.RunFolderError(
            f"{run_dir}: no checkpoint yet: the run has not finished an epoch (there is no bestmodel.pt). Let it "
            "train at least one epoch, or point at a run folder of main.py."
        )
    try:
        best = torch.load(best_path, map_location="cpu", weights_only=True)
    except PermissionError as err:  # this user may not read it: not a damaged file
        raise checkpoint.RunFolderError(checkpoint.permission_message(best_path, err, "predict")) from None
    except Exception as err:  # truncated, corrupt, or holding objects weights_only refuses: never run its code
        raise checkpoint.RunFolderError(
            f"{best_path} cannot be read safely ({type(err).__name__}: {_first_line(err)}). It is damaged or was not "
            "written by main.py; train the run again (or restore the file)."
        ) from None
    state = best.get("model") if isinstance(best, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("head.weight"), torch.Tensor):
        raise checkpoint.RunFolderError(
            f"{best_path} holds no model weights main.py would write; train the run again (or restore the file)."
        )
    cfg = _read_config(run_dir, best)
    num_classes = datasets.DATASET_INFO[cfg.dataset].num_classes
    if state["head.weight"].ndim != 2 or state["head.weight"].shape[0] != num_classes:
        raise checkpoint.RunFolderError(
            f"{best_path} scores {state['head.weight'].shape[0]} classes but the run's dataset {cfg.dataset} has "
            f"{num_classes}: the file belongs to another run. Restore this run's bestmodel.pt or train it again."
        )
    model = models.build_model(
        cfg.arch, num_classes, use_pretrained=False, boostlu_alpha=cfg.boostlu_alpha, image_size=cfg.image_size
    )
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise checkpoint.RunFolderError(
            f"{best_path} does not fit the run's model (--arch {cfg.arch}, {num_classes} classes): {mismatch}. It "
            "belongs to another run or was altered; restore it or train the run again."
        )
    damaged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:  # training stops on a non-finite loss, so such weights were damaged afterwards: every score NaN
        raise checkpoint.RunFolderError(
            f"{best_path} holds non-finite weights (NaN or infinity in {', '.join(damaged[:3])}"
            f"{' ...' if len(damaged) > 3 else ''}): every score would be NaN. Restore it or train the run again."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # anything the key and shape check above did not foresee
        raise checkpoint.RunFolderError(
            f"{best_path} does not fit the run's model: {_first_line(err)}. Restore it or train the run again."
        ) from None
    try:
        names = datasets.class_names(cfg.dataset, cfg.data_root)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError):  # a damaged names file: numbers will do
        names = [f"class {i}" for i in range(num_classes)]
    epoch = best.get("epoch") if isinstance(best.get("epoch"), int) else None
    return Run(run_dir, cfg, model.eval(), names, epoch)


def _state_mismatch(expected: dict, state: dict) -> str:
    """What keeps ``state`` from loading into a model with ``expected``'s keys and shapes ('' when nothing)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        k for k in expected if k in state and getattr(state[k], "shape", None) != getattr(expected[k], "shape", None)
    ]
    kinds = ((missing, "weights missing"), (unexpected, "unknown weights"), (reshaped, "weights of another shape"))
    return "; ".join(f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in kinds if keys)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Paths -> image files -> batches.


def find_images(paths: list[str]) -> list[str]:
    """Every image file under ``paths`` (folders recursively, in sorted order; files named as given), each once."""
    found: dict[str, None] = {}
    for given in paths:
        path = Path(given)
        if path.is_file():
            found[str(path)] = None
        elif path.is_dir():
            inside = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
            if not inside:
                print(f"note: {path} holds no image files ({' '.join(sorted(IMAGE_EXTENSIONS))})", file=sys.stderr)
            found.update(dict.fromkeys(str(p) for p in inside))
        else:
            raise PredictError(f"{given} does not exist; name image files or folders that hold them.")
    if not found:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise PredictError(f"No image files in {', '.join(paths)} (searched recursively for {exts}, any case).")
    return list(found)


class ImageFiles(torch.utils.data.Dataset):
    """Items are ``(uint8 C x H x W image or None, index, error message or None)``: an unreadable file is reported,
    not raised, so one bad file does not stop the others. With ``pass_order`` (``--eval_resize device``) the image is
    only decoded, as a ``resize.Decoded`` that the device resizes to the same pixels."""

    def __init__(self, files: list[str], image_size: int, pass_order: str | None = None) -> None:
        self.files = files
        self.image_size = image_size
        self.pass_order = pass_order

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = loaders.loader_item(self.files[index], self.image_size, self.pass_order)
        except datasets.DataError as err:
            return None, index, str(err)
        except Exception as err:  # e.g. PIL's DecompressionBombError: still just an unreadable file here
            return None, index, f"Cannot decode image {self.files[index]}: {type(err).__name__}: {_first_line(err)}"
        return image, index, None


def collate(items):
    """-> (uint8 batch of the readable images, or their ``resize.DecodedBatch``, or None; their indices;
    [(index, error)] of the unreadable ones)."""
    good = [(image, index) for image, index, error in items if error is None]
    bad = [(index, error) for _, index, error in items if error is not None]
    images = loaders.collate_images(good)[0] if good else None
    return images, [index for _, index in good], bad


def _default_num_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is available here; use --device cpu (or auto).")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


@torch.inference_mode()
def score_files(
    run: Run,
    files: list[str],
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    num_workers: int = 0,
    eval_resize: str = "workers",
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Sigmoid probabilities (fp32, on the CPU) of every readable file, and ``(file, error)`` for the unreadable
    ones. The arithmetic of ``evaluation.predict``: ``to_model_input`` on the device, the run's autocast (bf16 on CUDA
    unless the run used fp32), the head in fp32; ``eval_resize`` as main.py's ``--eval_resize``."""
    import train  # the run's autocast rule; imported here so that ``cam.py`` does not pay for it

    device = device or torch.device("cpu")
    model = run.model.to(device).eval()
    amp = train.autocast_for(run.cfg, device)
    num_batches = -(-len(files) // batch_size)
    order = None
    if eval_resize == "device":  # the installed Pillow's pass order, checked on probe images and on the first files
        order = resize.checked_pass_order()
        loaders.check_device_resize(files[:64], run.cfg.image_size, device, order)
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, run.cfg.image_size, order),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers if num_batches > 1 else 0,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    scores: dict[str, torch.Tensor] = {}
    skipped: list[tuple[str, str]] = []
    for images, indices, bad in tqdm(loader, desc="predict", file=sys.stderr, leave=False, disable=num_batches <= 1):
        skipped += [(files[i], error) for i, error in bad]
        if images is None:
            continue
        with amp():
            logits = model(loaders.to_model_input(loaders.batch_to_device(images, device)))
        probs = torch.sigmoid(logits.float()).cpu()
        scores.update({files[i]: p for i, p in zip(indices, probs, strict=True)})
    return scores, skipped


# ---------------------------------------------------------------------------------------------------------------------
# Scores -> labels -> csv / json.


def select_labels(
    probs: torch.Tensor, names: list[str], *, top_k: int | None = None, threshold: float | None = None
) -> list[tuple[str, float]]:
    """``(label, probability)``, most probable first: the ``top_k`` highest (with ``threshold`` too: those of them at
    least the threshold), or, without ``top_k``, every label at least ``threshold`` (0.5 when not given)."""
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    if top_k is None or threshold is not None:
        limit = 0.5 if threshold is None else threshold
        order = [c for c in order if probs[c] >= limit]
    return [(names[c], float(probs[c])) for c in order]


def format_predictions(predictions: list[tuple[str, list[tuple[str, float]]]], fmt: str) -> str:
    """csv: ``path,label,probability``, a row per label (an image with no label gets one row with both empty);
    json: ``[{"path": ..., "labels": [{"label": ..., "probability": ...}]}]``. Probabilities to 6 decimals."""
    if fmt == "json":
        rows = [
            {"path": path, "labels": [{"label": name, "probability": round(p, 6)} for name, p in labels]}
            for path, labels in predictions
        ]
        return json.dumps(rows, indent=2) + "\n"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "probability"])
    for path, labels in predictions:
        for name, p in labels or [("", None)]:
            writer.writerow([path, name, "" if p is None else f"{p:.6f}"])
    return out.getvalue()


def _argument(convert, valid, expected: str):
    """An argparse type: ``convert(text)``, refused with "``expected`` is expected" unless ``valid(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected} is expected, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{expected} is expected, got {text!r}")
        return value

    return parse


positive_int = _argument(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _argument(int, lambda v: v >= 0, "an integer >= 0")
_probability = _argument(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder of main.py (holding bestmodel.pt and config.json)")
    parser.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--top_k", type=positive_int, default=None, help="the K most probable labels per image")
    parser.add_argument(
        "--threshold", type=_probability, default=None, help="labels with at least this probability (default 0.5)"
    )
    parser.add_argument("--format", default="csv", choices=("csv", "json"), help="output format (default csv)")
    parser.add_argument("--output", type=Path, default=None, help="write to this file (default: standard output)")
    batch = _argument(int, lambda v: 1 <= v <= config_rules.MAX_BATCH, f"an integer from 1 to {config_rules.MAX_BATCH}")
    parser.add_argument("--batch_size", type=batch, default=64, help="images per batch (default 64)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if available")
    parser.add_argument(
        "--num_workers", type=_non_negative_int, default=None, help="image decoding processes (default: cores, max 8)"
    )
    parser.add_argument(
        "--eval_resize",
        default="workers",
        choices=config.EVAL_RESIZES,
        help="where images are resized: workers (PIL) or device (the same pixels, as main.py's --eval_resize)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        run = load_run(args.run_dir)
        if args.top_k is not None and args.top_k > len(run.class_names):
            parser.error(f"--top_k {args.top_k}: the run scores only {len(run.class_names)} classes")
        files = find_images(args.paths)
        if args.output is not None:  # before any work: never replace an input image or a file of a run
            tool_io.refuse_overwrite(args.output, "--output", inputs=files, run_dirs=[args.run_dir])
        workers = _default_num_workers() if args.num_workers is None else args.num_workers
        scores, skipped = score_files(
            run, files, batch_size=args.batch_size, device=device, num_workers=workers, eval_resize=args.eval_resize
        )
        if not scores:
            raise PredictError(
                f"None of the {len(files)} image files could be read, e.g. {skipped[0][1]} Check the files (or the "
                "paths) and try again."
            )
        if skipped:
            noun = "file" if len(skipped) == 1 else "files"
            print(f"skipped {len(skipped)} unreadable {noun}, e.g. {skipped[0][1]}", file=sys.stderr)
        predictions = [
            (f, select_labels(scores[f], run.class_names, top_k=args.top_k, threshold=args.threshold))
            for f in files
            if f in scores
        ]
        unlabelled = sum(not labels for _, labels in predictions)
        if unlabelled:  # an empty row is no error, but a short run may leave every image there: say why
            limit = 0.5 if args.threshold is None else args.threshold
            print(
                f"note: {unlabelled} of {len(predictions)} images have no label with probability >= {limit:g} (a "
                "lower --threshold, or --top_k K for the K most probable whatever their probability)",
                file=sys.stderr,
            )
        text = format_predictions(predictions, args.format)
        if args.output is None:
            sys.stdout.write(text)
        else:
            if args.output.is_dir():
                raise PredictError(f"--output {args.output} is a folder; name a file to write.")
            try:
                write_atomic(args.output, lambda f: f.write(tool_io.encode_text(text)))  # any file name's bytes
            except OSError as err:
                raise PredictError(f"Cannot write --output {args.output}: {err.strerror or err}.") from None
            print(f"wrote predictions for {len(predictions)} images to {args.output}", file=sys.stderr)
    except (
        PredictError,
        checkpoint.RunFolderError,
        datasets.DataError,
        resize.ResizeUnavailable,
        tool_io.OverwriteRefused,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {INTERRUPTED}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    tool_io.run(main, interrupted=INTERRUPTED)
