"""Training throughput: an official-style pipeline against this project's, same machine, same process, same model.

    python bench/throughput.py            # ResNet-50, 448x448, batch 16, 640x480 JPEGs (for a GPU)
    python bench/throughput.py --small    # ResNet-18, 64x64, 128x96 JPEGs: runs on a CPU in under a minute

(a) official-style (as the released code, snucml/LargeLossMatters, does it): per item, PIL decode, ``Resize((S, S))``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in 4 DataLoader workers; fp32, NCHW.
(b) this project: PIL decode and resize in the workers (one per core), uint8 batches in pinned memory, flip and
normalisation on the device, channels-last, bf16 autocast on CUDA (fp32 on CPU); and (c) the same reading the disk
cache instead of decoding. All train the same model with the same optimiser and LL-R loss. Each pipeline is measured
in steady state (after warm-up batches): training images/s and the data path alone (loading, copy, preprocessing).
Prints one JSON object: both pipelines, the ratios, peak GPU memory, and the COCO run time the throughput implies.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402

# COCO 2014 in the paper's protocol: 82,081 official train images -> 65,665 train + 16,416 val; 40,137 test.
COCO = {"train": 65665, "val": 16416, "test": 40137, "epochs": 10}


def _write_jpeg(args: tuple[str, int, int, int]) -> None:
    """A photo-like JPEG: smooth colour fields, edges and sensor noise, quality 90 (COCO's are of that order)."""
    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        image[y0 : y0 + rng.integers(20, height), x0 : x0 + rng.integers(20, width)] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 8, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(folder: Path, count: int, width: int, height: int) -> list[str]:
    return make_jpegs_named(folder, [f"{i:05d}.jpg" for i in range(count)], width, height)


def make_jpegs_named(folder: Path, names: list[str], width: int, height: int) -> list[str]:
    """Photo-like JPEGs with these file names in ``folder``, written by one process per core."""
    paths = [str(folder / name) for name in names]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_write_jpeg, [(p, width, height, i) for i, p in enumerate(paths)])
    return paths


class OfficialStyle(torch.utils.data.Dataset):
    """The released code's dataset: PIL open, convert RGB, torchvision transforms, per item."""

    def __init__(self, paths: list[str], size: int) -> None:
        mean, std = datasets.IMAGENET_MEAN, datasets.IMAGENET_STD
        self.paths = paths
        self.tx = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.RandomHorizontalFlip(0.5),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as raw:
            return self.tx(raw.convert("RGB")), i


def _batches(loader, count: int):
    """``count`` batches, cycling the loader as often as needed."""
    done = 0
    while True:
        for batch in loader:
            yield batch
            done += 1
            if done == count:
                return


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loader, step, device, warmup: int, count: int, batch_size: int) -> float:
    """Images per second of ``step(batch)`` over ``count`` batches after ``warmup`` batches."""
    it = _batches(loader, warmup + count)
    for _ in range(warmup):
        step(next(it))
    _sync(device)
    start = time.perf_counter()
    for batch in it:
        step(batch)
    _sync(device)
    return count * batch_size / (time.perf_counter() - start)


def run_pipeline(name: str, loader, prepare, model, device, amp, args) -> dict:
    """Data-path and training throughput of one pipeline; ``prepare(batch)`` gives the model's float input."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    num_classes = model.head.out_features
    generator = torch.Generator().manual_seed(0)
    observed = (torch.rand(len(loader.dataset), num_classes, generator=generator) < 0.05).to(torch.int8)

    def data_step(batch):
        prepare(batch)

    def train_step(batch):
        x = prepare(batch)
        with amp():
            logits = model(x)
        loss, _ = losses.large_loss(logits, observed[batch[1]].to(device, non_blocking=True), "LL-R", 0.004)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"data_img_s": measure(loader, data_step, device, args.warmup, args.batches, args.bsize)}
    model.train()
    result["train_img_s"] = measure(loader, train_step, device, args.warmup, args.batches, args.bsize)
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{name}: {json.dumps({k: round(v, 2) for k, v in result.items()})}", file=sys.stderr)
    return result


@torch.inference_mode()
def eval_throughput(model, loader, prepare, device, amp, args) -> float:
    model.eval()

    def step(batch):
        with amp():
            model(prepare(batch))

    return measure(loader, step, device, args.warmup, args.batches // 2 + 1, loader.batch_sampler.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="ResNet-18 on small images: a CPU check in a minute")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 1024; small 128)")
    parser.add_argument("--batches", type=int, default=None, help="measured batches (default 150; small 8)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up batches (default 25; small 2)")
    parser.add_argument("--bsize", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="this project's workers (default: all cores)")
    args = parser.parse_args()
    small = args.small
    arch, size, jpeg_size = ("resnet18", 64, (128, 96)) if small else ("resnet50", 448, (640, 480))
    args.images = args.images or (128 if small else 1024)
    args.batches = args.batches or (8 if small else 150)
    args.warmup = args.warmup or (2 if small else 25)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or cores
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    num_classes = 80

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        paths = make_jpegs(Path(tmp), args.images, *jpeg_size)
        generated = time.time() - t
        out = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({cores} cores)", "arch": arch,
               "image_size": size, "jpeg_size": list(jpeg_size), "batch_size": args.bsize, "images": args.images,
               "jpeg_generation_s": round(generated, 1), "torch": torch.__version__}  # fmt: skip

        # (a) official-style
        torch.manual_seed(0)
        model = models.build_model(arch, num_classes, use_pretrained=False).to(device)
        loader = torch.utils.data.DataLoader(
            OfficialStyle(paths, size), batch_size=args.bsize, shuffle=True, num_workers=4, pin_memory=cuda,
            drop_last=False, persistent_workers=True,
        )  # fmt: skip

        def official_prepare(batch):
            return batch[0].to(device, non_blocking=True)

        official = run_pipeline("official-style", loader, official_prepare, model, device, _no_amp, args)
        del loader

        # (b) this project, decoding in workers; (c) the same from the disk cache
        torch.manual_seed(0)
        model = models.build_model(arch, num_classes, use_pretrained=False).to(
            device, memory_format=torch.channels_last
        )
        amp = _bf16_amp(device) if cuda else _no_amp
        split = datasets.Split(tmp, np.array([Path(p).name for p in paths]), None, None)
        sampler = datasets.EpochBatches(len(paths), args.bsize, shuffle=True, seed=0)
        flips = sampler.flips

        def project_prepare(batch):
            images, idx = batch
            return datasets.to_model_input(images.to(device, non_blocking=True), flips[idx].to(device))

        def project_loader(cache):
            return torch.utils.data.DataLoader(
                datasets.ImageDataset(split, size, cache), batch_sampler=sampler, collate_fn=datasets.collate_images,
                num_workers=workers, pin_memory=cuda, persistent_workers=True, prefetch_factor=4,
            )  # fmt: skip

        project = run_pipeline("project", project_loader(None), project_prepare, model, device, amp, args)
        cache = datasets.build_disk_cache(split, size, Path(tmp) / "cache" / "bench.u8", workers)
        project_cache = run_pipeline(
            "project + disk cache", project_loader(cache), project_prepare, model, device, amp, args
        )
        eval_loader = torch.utils.data.DataLoader(
            datasets.ImageDataset(split, size), batch_sampler=datasets.EpochBatches(len(paths), args.bsize * 4,
            shuffle=False), collate_fn=datasets.collate_images, num_workers=workers, pin_memory=cuda,
            persistent_workers=True, prefetch_factor=4,
        )  # fmt: skip
        eval_img_s = eval_throughput(model, eval_loader, lambda b: project_prepare((b[0], b[1])), device, amp, args)

    out.update(official=official, project=project, project_disk_cache=project_cache, project_eval_img_s=eval_img_s)
    out["ratio_train"] = project["train_img_s"] / official["train_img_s"]
    out["ratio_data"] = project["data_img_s"] / official["data_img_s"]
    out["ratio_train_disk_cache"] = project_cache["train_img_s"] / official["train_img_s"]
    if not small:  # the paper's COCO run: 10 epochs of train + val, then test, at these rates
        minutes = {}
        for name, train_rate in (("official_style", official["train_img_s"]), ("project", project["train_img_s"])):
            seconds = (
                COCO["epochs"] * (COCO["train"] / train_rate + COCO["val"] / eval_img_s) + COCO["test"] / eval_img_s
            )
            minutes[name] = round(seconds / 60, 1)
        out["estimated_coco_run_minutes"] = minutes
    print(json.dumps(_rounded(out)))


def _no_amp():
    return torch.autocast("cpu", enabled=False)


def _bf16_amp(device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    main()
