"""The scoring pass's rate (pseudo_labels.py) beside the CLIP model's own rate on the same crops.

    python bench/clip_scoring.py                         # a tiny random CLIP on the CPU (no weights needed)
    python bench/clip_scoring.py --clip ViT-B-16 --device cuda --images 512 --batch 512

The pass: JPEG files decoded and cut into the whole image and a grid of crops, both flips (``ViewsDataset``, in loader
workers), normalised on the device, encoded under bf16 autocast on CUDA, compared with the prompts. Model alone: the
same number of crops, already normalised on the device, through ``encode_image`` in batches of the same size. The
target is a pass at 0.9 of the model-alone rate or better. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_scores  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="tiny", help="open_clip model name; 'tiny': a tiny random CLIP")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="crops per model call")
    parser.add_argument("--num_workers", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    open_clip = clip_scores.import_open_clip()
    name = args.clip
    if name == "tiny":
        name = "bench-tiny-clip"
        open_clip.factory._MODEL_CONFIGS[name] = TINY
    torch.manual_seed(0)
    model, tokenizer = clip_scores.load_clip(name, None, device)
    size = clip_scores._image_size(model)
    texts = clip_scores.text_features(model, tokenizer, [f"a photo of a class {i}." for i in range(80)], device)
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        names = np.array([f"{i}.jpg" for i in range(args.images)])
        for n in names:
            Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(Path(folder) / n)
        fill = clip_scores.clip_fill(model, texts, folder, names, args.grid, size, device, args.batch,
                                       args.num_workers, "imagenet")  # fmt: skip
        for _ in fill(np.arange(min(8, args.images))):  # warm-up: workers, kernels
            pass
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        for _ in fill(np.arange(args.images)):
            pass
        sync()
        pass_s = time.perf_counter() - started
    crops = args.images * 2 * (1 + args.grid * args.grid)
    x = torch.randn(args.batch, 3, size, size, device=device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    with torch.inference_mode(), amp():
        model.encode_image(x)
        sync()
        started = time.perf_counter()
        for start in range(0, crops, args.batch):
            model.encode_image(x[: min(args.batch, crops - start)])
        sync()
    model_s = time.perf_counter() - started
    rates = {"pass_crops_per_s": round(crops / pass_s, 1), "model_alone_crops_per_s": round(crops / model_s, 1)}
    print(json.dumps({"clip": args.clip, "device": str(device), "images": args.images, "crops": crops, **rates,
                      "ratio": round(model_s / pass_s, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
