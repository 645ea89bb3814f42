"""The host's share of ``--eval_resize device``: CPU time per image in a loader worker, with and without the resize.

    python bench/eval_resize_cpu.py             # 300 photo-like 640x480 JPEGs -> 448x448, batches of 16
    python bench/eval_resize_cpu.py --small     # 32 images, 3 rounds (a test runs it)

On a GPU machine each worker's CPU time per image is what bounds evaluation (one worker per core). This measures it
for the two ways a worker can make an evaluation batch, in one process on one thread (as in a worker), alternating
round by round so that both see the same machine state: ``workers`` (``--eval_resize workers``: decode, PIL resize,
``collate_images``) and ``device`` (``--eval_resize device``: decode and ``resize.DecodedBatch.collate``, the resize
left to the device). Prints one JSON object with the median milliseconds per image of each and their ratio. It does not
measure the device's side (the GPU check does: ``data_path.device_resize_img_s``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import throughput  # noqa: E402

import datasets  # noqa: E402
import loaders  # noqa: E402
import resize  # noqa: E402


def batches_cpu_seconds(dataset: loaders.ImageDataset, bsize: int) -> float:
    """Process CPU time to turn every image of ``dataset`` into batches, as a worker does."""
    start = time.process_time()
    for first in range(0, len(dataset), bsize):
        loaders.collate_images([dataset[i] for i in range(first, min(first + bsize, len(dataset)))])
    return time.process_time() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="32 images and 3 rounds")
    args = parser.parse_args(argv)
    count, rounds = (32, 3) if args.small else (300, 10)
    size, bsize = 448, 16
    torch.set_num_threads(1)  # a worker's torch runs on one thread
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"{i:05d}.jpg" for i in range(count)]
        paths = throughput.make_jpegs_named(Path(tmp), names, 640, 480)
        split = datasets.Split("", np.array(paths), None, None)
        ways = {
            "workers": loaders.ImageDataset(split, size),
            "device": loaders.ImageDataset(split, size, pass_order=resize.checked_pass_order()),
        }
        for dataset in ways.values():  # warm-up: file cache, the weights' cache
            batches_cpu_seconds(dataset, bsize)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, dataset in ways.items():
                times[name].append(batches_cpu_seconds(dataset, bsize) / count * 1000)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "images": count,
        "rounds": rounds,
        "jpeg": [640, 480],
        "size": size,
        "ms_per_image": {name: round(m, 3) for name, m in medians.items()},
        "ratio_device_vs_workers": round(medians["device"] / medians["workers"], 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
