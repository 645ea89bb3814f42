"""Training throughput: an official-style pipeline against this project's, same machine, same process, same model.

    python bench/throughput.py                    # ResNet-50, 448x448, batch 16, 640x480 JPEGs (for a GPU)
    python bench/throughput.py --small            # ResNet-18, 64x64, 128x96 JPEGs: a CPU check in a minute or two
    python bench/throughput.py --arch resnet101   # any name main.py's --arch takes, built as main.py builds it

(a) official-style (as the released code, snucml/LargeLossMatters, does it): per item, PIL decode, ``Resize((S, S))``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in 4 DataLoader workers; fp32, NCHW, ``cudnn.benchmark`` off
(the official code never turns it on). (b) this project: PIL decode and resize in the workers (one per core), uint8
batches in pinned memory, flip and normalisation on the device, channels-last, bf16 autocast on CUDA (fp32 on CPU),
``cudnn.benchmark`` on (as main.py); and (c) the same reading the disk cache instead of decoding. All train the same
model with the same optimiser and LL-R loss. (d) the model alone: the same training step on a batch already on the
device (this project's precision and layout), the rate no data path can beat.

Every pipeline is timed the same way, the way the GPU check reads main.py's rates (from the epochs after the first):
one full warm-up pass over its loader (every batch shape, every worker started, cuDNN's choices made), then a window of
full batches only (``measure`` refuses a batch of another size inside it: a smaller last batch would be timed at
another shape, and under ``cudnn.benchmark`` a new shape re-times every convolution inside the window). So the image
count must be a multiple of the batch (and of the evaluation batch, 4 x ``--bsize``), and the official-style loader
drops its last batch. Prints one JSON object: the pipelines, the ratios, peak GPU memory, and the COCO run time the
rates imply.
"""

from __future__ import annotations

import argparse
import contextlib
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
import loaders  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402

# COCO 2014 in the paper's protocol: 82,081 official train images -> 65,665 train + 16,416 val; 40,137 test.
COCO = {"train": 65665, "val": 16416, "test": 40137, "epochs": 10}
NUM_CLASSES = 80


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
        mean, std = loaders.IMAGENET_MEAN, loaders.IMAGENET_STD
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


class PartialBatchError(ValueError):
    """A batch of another size than the measured one inside a timed window."""


def measure(loader, step, device, count: int, batch_size: int) -> float:
    """Images per second of ``step(batch)`` over ``count`` full batches (the loader cycled as often as needed), after
    one full warm-up pass over ``loader``. Each timed batch must hold ``batch_size`` images (``batch[1]``: the indices):
    a batch of another size raises ``PartialBatchError`` instead of being timed, since its new shape would be timed
    apart from the rest (and, under ``cudnn.benchmark``, re-time every convolution inside the window)."""
    for batch in loader:  # the warm-up pass: as main.py's first epoch, left out of its rates
        step(batch)
    _sync(device)
    start = time.perf_counter()
    for batch in _batches(loader, count):
        if len(batch[1]) != batch_size:
            raise PartialBatchError(
                f"a batch of {len(batch[1])} images inside a timed window of batches of {batch_size}: time full "
                "batches only (drop_last=True, or an image count that is a multiple of the batch size)"
            )
        step(batch)
    _sync(device)
    return count * batch_size / (time.perf_counter() - start)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """``torch.backends.cudnn.benchmark`` set to ``enabled`` for the block: off for the official-style pipeline (the
    official code never turns it on), on for this project's (as main.py)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """The model as main.py builds it for ``--arch arch`` (``models.build_model``), without pretrained weights (a
    benchmark's machine may have no network; the weights do not change the speed)."""
    return models.build_model(arch, num_classes, use_pretrained=False)


def run_pipeline(name: str, loader, prepare, model, device, amp, args, *, benchmark: bool) -> dict:
    """Data-path and training throughput of one pipeline (``measure``: a full warm-up pass, then full batches only),
    with ``cudnn.benchmark`` set to ``benchmark``; ``prepare(batch)`` gives the model's float input."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    num_classes = NUM_CLASSES
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
    with cudnn_benchmark(benchmark):
        result = {"data_img_s": measure(loader, data_step, device, args.batches, args.bsize)}
        model.train()
        result["train_img_s"] = measure(loader, train_step, device, args.batches, args.bsize)
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{name}: {json.dumps({k: round(v, 2) for k, v in result.items()})}", file=sys.stderr)
    return result


@torch.inference_mode()
def eval_throughput(model, loader, prepare, device, amp, args, *, benchmark: bool) -> float:
    """Evaluation images per second (``measure``), with ``cudnn.benchmark`` set to ``benchmark``."""
    model.eval()

    def step(batch):
        with amp():
            model(prepare(batch))

    with cudnn_benchmark(benchmark):
        return measure(loader, step, device, args.batches // 2 + 1, loader.batch_sampler.batch_size)


def model_alone(model, device, amp, size: int, args) -> dict:
    """The model alone, as this project runs it (channels-last, ``amp``, ``cudnn.benchmark`` on): the training step
    (LL-R's loss, Adam) and evaluation at 4 x ``--bsize``, on batches already on the device: the rate no data path can
    beat. Warm-up and window as ``measure``'s (a pass's worth of batches first)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.bsize, 3, size, size), dtype=torch.uint8, device=device)
    x = loaders.to_model_input(images)
    eval_x = loaders.to_model_input(images.repeat(loaders.EVAL_BATCH_FACTOR, 1, 1, 1))
    observed = (torch.rand(args.bsize, NUM_CLASSES, device=device) < 0.05).to(torch.int8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    fake = [(None, range(args.bsize))] * (args.images // args.bsize)  # a pass's worth of full batches

    def train_step(_batch):
        with amp():
            logits = model(x)
        loss, _ = losses.large_loss(logits, observed, "LL-R", 0.004)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def eval_step(_batch):
        with amp():
            model(eval_x)

    with cudnn_benchmark(True):
        model.train()
        result = {"train_img_s": measure(fake, train_step, device, args.batches, args.bsize)}
        model.eval()
        eval_fake = [(None, range(len(eval_x)))] * max(len(fake) // loaders.EVAL_BATCH_FACTOR, 1)
        result["eval_img_s"] = measure(eval_fake, eval_step, device, args.batches // 2 + 1, len(eval_x))
    print(f"model alone: {json.dumps({k: round(v, 2) for k, v in result.items()})}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small images (and ResNet-18 unless --arch): a CPU check")
    parser.add_argument("--arch", default=None, help="any --arch main.py takes (default resnet50; small: resnet18)")
    parser.add_argument("--image_size", type=int, default=None, help="model input size (default 448; small 64)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 1024; small 128)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default 150; small 8)")
    parser.add_argument("--bsize", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="this project's workers (default: all cores)")
    args = parser.parse_args()
    small = args.small
    arch = args.arch or ("resnet18" if small else "resnet50")
    size = args.image_size or (64 if small else 448)
    jpeg_size = (128, 96) if small else (640, 480)
    args.images = args.images or (128 if small else 1024)
    args.batches = args.batches or (8 if small else 150)
    eval_batch = args.bsize * loaders.EVAL_BATCH_FACTOR
    if args.images % eval_batch:
        parser.error(f"--images must be a multiple of {eval_batch} (4 x --bsize): every timed batch is a full one")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or cores
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    amp = _bf16_amp(device) if cuda else _no_amp

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        paths = make_jpegs(Path(tmp), args.images, *jpeg_size)
        generated = time.time() - t
        out = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({cores} cores)", "arch": arch,
               "image_size": size, "jpeg_size": list(jpeg_size), "batch_size": args.bsize, "images": args.images,
               "timed_batches": args.batches, "jpeg_generation_s": round(generated, 1), "torch": torch.__version__,
               "timing": "one full warm-up pass, then full batches only; cudnn.benchmark off for official-style, on "
                         "for this project"}  # fmt: skip

        # (a) official-style: fp32, NCHW, cudnn.benchmark off, the last (smaller) batch dropped
        torch.manual_seed(0)
        model = build_model(arch, NUM_CLASSES).to(device)
        loader = torch.utils.data.DataLoader(
            OfficialStyle(paths, size), batch_size=args.bsize, shuffle=True, num_workers=4, pin_memory=cuda,
            drop_last=True, persistent_workers=True,
        )  # fmt: skip

        def official_prepare(batch):
            return batch[0].to(device, non_blocking=True)

        official = run_pipeline("official-style", loader, official_prepare, model, device, _no_amp, args,
                                benchmark=False)  # fmt: skip
        official["eval_img_s"] = eval_throughput(model, loader, official_prepare, device, _no_amp, args,
                                                 benchmark=False)  # fmt: skip
        del loader

        # (b) this project, decoding in workers; (c) the same from the disk cache; (d) the model alone
        torch.manual_seed(0)
        model = build_model(arch, NUM_CLASSES).to(device, memory_format=torch.channels_last)
        split = datasets.Split(tmp, np.array([Path(p).name for p in paths]), None, None)
        sampler = loaders.EpochBatches(len(paths), args.bsize, shuffle=True, seed=0)
        flips = sampler.flips

        def project_prepare(batch):
            images, idx = batch
            return loaders.to_model_input(images.to(device, non_blocking=True), flips[idx].to(device))

        def project_loader(cache):
            return torch.utils.data.DataLoader(
                loaders.ImageDataset(split, size, cache), batch_sampler=sampler, collate_fn=loaders.collate_images,
                num_workers=workers, pin_memory=cuda, persistent_workers=True, prefetch_factor=4,
            )  # fmt: skip

        project = run_pipeline("project", project_loader(None), project_prepare, model, device, amp, args,
                               benchmark=True)  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # its size line: stdout holds the one JSON object
            cache = loaders.build_disk_cache(split, size, Path(tmp) / "cache" / "bench.u8", workers)
        project_cache = run_pipeline("project + disk cache", project_loader(cache), project_prepare, model, device,
                                     amp, args, benchmark=True)  # fmt: skip
        eval_loader = torch.utils.data.DataLoader(
            loaders.ImageDataset(split, size), batch_sampler=loaders.EpochBatches(len(paths), eval_batch,
            shuffle=False), collate_fn=loaders.collate_images, num_workers=workers, pin_memory=cuda,
            persistent_workers=True, prefetch_factor=4,
        )  # fmt: skip
        eval_img_s = eval_throughput(model, eval_loader, lambda b: project_prepare((b[0], b[1])), device, amp, args,
                                     benchmark=True)  # fmt: skip
        alone = model_alone(model, device, amp, size, args)

    out.update(official=official, project=project, project_disk_cache=project_cache, project_eval_img_s=eval_img_s,
               model_alone=alone)  # fmt: skip
    out["ratio_train"] = project["train_img_s"] / official["train_img_s"]
    out["ratio_data"] = project["data_img_s"] / official["data_img_s"]
    out["ratio_train_disk_cache"] = project_cache["train_img_s"] / official["train_img_s"]
    out["ratio_eval"] = eval_img_s / official["eval_img_s"]
    out["ratio_train_vs_model_alone"] = project["train_img_s"] / alone["train_img_s"]
    out["ratio_official_train_vs_model_alone"] = official["train_img_s"] / alone["train_img_s"]
    if not small:  # the paper's COCO run: 10 epochs of train + val, then test, at these rates
        minutes = {}
        for name, train_rate, eval_rate in (("official_style", official["train_img_s"], official["eval_img_s"]),
                                            ("project", project["train_img_s"], eval_img_s)):  # fmt: skip
            seconds = COCO["epochs"] * (COCO["train"] / train_rate + COCO["val"] / eval_rate) + COCO["test"] / eval_rate
            minutes[name] = round(seconds / 60, 1)
        out["estimated_coco_run_minutes"] = minutes
    print(json.dumps(_rounded(out)))


def _no_amp():
    return contextlib.nullcontext()


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
