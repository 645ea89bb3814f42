"""Class activation maps of a trained run: each image beside the CAMs of its top-scored classes (the paper's
qualitative figure).

    python cam.py results/<run> image1.jpg [image2.jpg ...] [--top 3] [--out results/<run>/cam]

The CAM of class c is the head applied at every position of the backbone's last feature map (``Conv1x1`` with the
head's weights; for BoostLU runs the map before the activation). Each map is upsampled to the image, scaled to
[0, 1] and drawn in a blue-to-red colour scale over the image. Writes ``<image stem>_cam.png`` per image
(``<stem>_2_cam.png`` ... for images of the same stem).
"""

from __future__ import annotations

import tool_io  # first: notes a Ctrl-C while torch imports (see tool_io)

# isort: split
import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import checkpoint
import datasets
import loaders
import models
from files import write_atomic
from predict import load_run, positive_int

PANEL = 256  # pixels per panel in the figure
INTERRUPTED = "Interrupted (Ctrl-C): every figure written so far is complete; run the same command again for the rest."


def colour_scale(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 along blue, cyan, yellow, red (a jet-like scale without matplotlib)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 128, 0], [200, 0, 0]], float)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * stops[low] + frac * stops[low + 1]).astype(np.uint8)


@torch.inference_mode()
def cam_figure(model: models.MultiLabelClassifier, image_path: str, image_size: int, names: list[str], top: int):
    """The figure for one image: the image, then one overlay per top class with its name and score."""
    pixels = loaders.load_image(image_path, image_size)
    x = loaders.to_model_input(loaders.pixels_to_tensor(pixels)[None])
    fmap = model.backbone(x)
    scores = torch.sigmoid(model(x))[0]
    cams = model.class_activation_map(fmap)[0]
    shown = Image.fromarray(pixels).resize((PANEL, PANEL), Image.BILINEAR)
    panels = [(shown, "input")]
    for c in scores.argsort(descending=True)[:top].tolist():
        cam = F.interpolate(cams[c][None, None], size=(PANEL, PANEL), mode="bilinear", align_corners=False)[0, 0]
        cam = (cam - cam.min()) / (cam.max() - cam.min()).clamp(min=1e-8)
        overlay = Image.blend(shown, Image.fromarray(colour_scale(cam.numpy())), 0.5)
        panels.append((overlay, f"{names[c]} {scores[c]:.2f}"))
    figure = Image.new("RGB", (PANEL * len(panels), PANEL + 20), "white")
    draw = ImageDraw.Draw(figure)
    for i, (panel, caption) in enumerate(panels):
        figure.paste(panel, (i * PANEL, 20))
        draw.text((i * PANEL + 4, 4), caption, fill="black")
    return figure


def figure_paths(images: list[str], out: Path) -> list[Path]:
    """``<out>/<image stem>_cam.png`` per image; ``<stem>_2_cam.png`` ... for a stem seen before (a/x.png and b/x.jpg:
    one figure must not replace the other)."""
    taken: set[str] = set()
    paths = []
    for image in images:
        name, k = f"{Path(image).stem}_cam.png", 1
        while name in taken:
            k += 1
            name = f"{Path(image).stem}_{k}_cam.png"
        taken.add(name)
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top", type=positive_int, default=3, help="how many of the top-scored classes to show")
    parser.add_argument("--out", type=Path, default=None, help="default: <run_dir>/cam")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir)
        for image in args.images:
            if not Path(image).is_file():
                raise datasets.DataError(f"The image {image} does not exist (or is not a file); name image files.")
        out = args.out or args.run_dir / "cam"
        paths = figure_paths(args.images, out)
        # Before anything is written: never into a run folder itself, over one of its files, or over an input image.
        tool_io.refuse_overwrite(out, "--out", inputs=args.images, run_dirs=[args.run_dir])
        for path in paths:
            tool_io.refuse_overwrite(path, f"--out {out}: the figure", inputs=args.images, run_dirs=[args.run_dir])
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise datasets.DataError(f"Cannot create the --out folder {out}: {err.strerror or err}.") from None
        for image, path in zip(args.images, paths, strict=True):
            png = io.BytesIO()  # encoded before the write, which is then short
            cam_figure(run.model, image, run.cfg.image_size, run.class_names, args.top).save(png, format="PNG")
            try:  # whole or not at all: a Ctrl-C or a full disk never leaves half a PNG
                write_atomic(path, lambda f, png=png: f.write(png.getbuffer()))
            except OSError as err:
                raise datasets.DataError(f"Cannot write {path}: {err.strerror or err}.") from None
            renamed = path.name != f"{Path(image).stem}_cam.png"
            print(f"wrote {path}" + (f" (for {image})" if renamed else ""))
    except (datasets.DataError, checkpoint.RunFolderError, tool_io.OverwriteRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    tool_io.run(main, interrupted=INTERRUPTED)
