"""The image loader machinery: decoding and resizing with PIL exactly as the paper's transforms do, uint8 batches,
their copies to the device (on a side stream on CUDA), the flip and normalisation on the device
(``to_model_input``), the disk cache (``--cache disk``), the seeded epoch sampler and the worker pool.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import distributed
import files
import resize
from label_rules import DataError
from models import IMAGENET_MEAN, IMAGENET_STD  # the pretrained weights' statistics, one definition

if TYPE_CHECKING:
    from datasets import Split


# ---------------------------------------------------------------------------------------------------------------------
# Images.


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit grayscale (PIL modes ``I;16*``, and ``I``, which older Pillow gives 16-bit PNGs) is
    scaled to 8 bits (v / 257, rounded), never clipped as ``convert("RGB")`` would (it maps nearly every pixel to
    255); every other mode (L, P, LA, RGBA, CMYK, 1, ...) goes through ``convert("RGB")``, as the paper's loader.
    An RGB image is returned as it is (``convert`` would only copy it)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def load_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 H x W x 3, resized to size x size with PIL bilinear: the paper's ``Resize((size, size))`` before
    ``ToTensor``, pixel for pixel (``to_rgb`` first)."""
    return _decoded(path, lambda image: np.array(image.resize((size, size), Image.BILINEAR)))


def decode_image(path: str) -> np.ndarray:
    """RGB uint8 H x W x 3 at the image's own size (``to_rgb``): ``load_image`` without the resize, which
    ``--eval_resize device`` does on the device (``resize.py``)."""
    return _decoded(path, np.array)


def decode_for_device(path: str, size: int, pass_order: str) -> resize.Decoded:
    """``decode_image`` as a ``resize.Decoded``, to be resized to ``size`` x ``size`` on the device in the pass order
    that ``pass_order`` (a key of ``resize.PASS_ORDERS``) gives the image's size."""
    pixels = decode_image(path)
    height, width = pixels.shape[:2]
    return resize.Decoded(pixels, size, resize.PASS_ORDERS[pass_order](width, height, size, size))


def loader_item(path: str, size: int, pass_order: str | None = None) -> torch.Tensor | resize.Decoded:
    """One image as a loader's item: uint8 C x H x W resized by PIL (``load_image``), or, with ``pass_order``
    (``--eval_resize device``), only decoded, for the device to resize (``decode_for_device``)."""
    if pass_order is not None:
        return decode_for_device(path, size, pass_order)
    return pixels_to_tensor(load_image(path, size))


def _decoded(path: str, pixels: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    try:
        with Image.open(path) as raw:
            return pixels(to_rgb(raw))
    except Image.DecompressionBombError as err:  # not an OSError: PIL refuses to decode that many pixels
        raise DataError(
            f"Cannot decode image {path}: it is too large to decode safely ({err}). Replace or remove the file."
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot decode image {path}: {err}. Replace or remove the file.") from None


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 pixels as a C x H x W tensor that views them: channels-last strides, the layout the model runs
    in (``to_model_input``), so no image is ever transposed on the host."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """C x H x W images (``pixels_to_tensor``) -> one N x C x H x W batch with channels-last strides: a straight copy
    of each image's pixels, into shared memory when in a DataLoader worker (``default_collate``). Any other layout
    gives the same values, only transposed on the way."""
    return torch.utils.data.default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def collate_images(items: list[tuple]) -> tuple[torch.Tensor | resize.DecodedBatch, torch.Tensor]:
    """``ImageDataset`` items -> (uint8 batch, as ``stack_images``, or the decoded images of ``--eval_resize device``
    as a ``resize.DecodedBatch``; int64 row indices)."""
    images, indices = zip(*items, strict=True)
    if isinstance(images[0], resize.Decoded):
        return resize.DecodedBatch.collate(list(images)), torch.tensor(indices)
    return stack_images(list(images)), torch.tensor(indices)


SIDE_STREAM_COPIES = True  # bench/gpu_check.py turns it off to measure what the side stream gives


def batch_to_device(images: torch.Tensor | resize.DecodedBatch, device: torch.device) -> torch.Tensor:
    """A loader batch as uint8 N x 3 x H x W on ``device``, copied without waiting (pinned memory); a
    ``resize.DecodedBatch`` is resized there, to the pixels the workers would have made.

    On a CUDA device the copy runs on a side stream: on the current stream it would wait for every kernel queued
    before it (the previous step's) and hold back every kernel after it, so the GPU would idle while the batch
    crosses the bus. The current stream waits for the copy only (an event on the device, not on the host), and the
    copy's memory is kept from reuse until that stream is done with it (``record_stream``). Same values."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the stream is cached per device: name the current one
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _copy_stream(device) if SIDE_STREAM_COPIES else None
    if stream is None:
        images = images.to(device, non_blocking=True)
    else:
        current = torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            images = images.to(device, non_blocking=True)
        current.wait_stream(stream)
        images.record_stream(current)
    return images.resize() if isinstance(images, resize.DecodedBatch) else images


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The side stream for host-to-device copies of ``device`` (``cuda:N``; None off CUDA: the copy is already the
    next thing)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def check_device_resize(
    paths: list[str], image_size: int, device: torch.device, pass_order: str, count: int = 8
) -> int:
    """``--eval_resize device`` against PIL on the data itself, once per run: up to ``count`` of ``paths`` of distinct
    sizes (from the files' headers) resized on ``device`` and by PIL, every pixel compared (one read-back from the
    device). ``resize.ResizeUnavailable`` naming the first image that differs; returns how many were compared. The
    start check (``resize.pass_order``) used probe images; this one uses the run's own sizes."""
    chosen, items, sizes = [], [], set()
    for path in paths:
        try:
            with Image.open(path) as image:
                size = image.size
            if size in sizes:
                continue
            items.append(decode_for_device(path, image_size, pass_order))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, DataError):
            continue  # an unreadable file (or one too large to decode) is reported or skipped where images are loaded
        sizes.add(size)
        chosen.append(path)
        if len(chosen) == count:
            break
    if not chosen:
        return 0
    resized = batch_to_device(resize.DecodedBatch.collate(items), device).cpu()
    for image, path in zip(resized, chosen, strict=True):
        if not torch.equal(image, loader_item(path, image_size)):
            raise resize.ResizeUnavailable(
                f"--eval_resize device: the device resize gives other pixels than PIL for {path} (checked at start on "
                f"{len(chosen)} images of distinct sizes), so it would not give the paper's pixels. Use --eval_resize "
                "workers (the default)."
            )
    return len(chosen)


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 image C x H x W, row index)`` (``pixels_to_tensor``; batched by ``collate_images``); labels
    stay with the trainer, which owns them.

    Decodes and resizes each image with PIL (in the DataLoader's workers), or, with ``cache``, reads the already
    resized pixels from a disk cache (``build_disk_cache``): the same bytes either way. With ``pass_order`` (a key of
    ``resize.PASS_ORDERS``: the installed Pillow's, ``resize.pass_order()``) it only decodes, and the item is a
    ``resize.Decoded`` that the device resizes to the same bytes (``--eval_resize device``).
    """

    def __init__(self, split: Split, image_size: int, cache: Path | None = None, pass_order: str | None = None) -> None:
        self.split = split
        self.image_size = image_size
        self.cache = cache
        self.pass_order = pass_order
        self._pixels: np.ndarray | None = None  # the cache's memory map, opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | resize.Decoded, int]:
        row = index if index >= 0 else -1 - index  # -1 - row: a padding copy of ``row`` (distributed.share)
        if self.cache is None:
            return loader_item(self.split.image_path(row), self.image_size, self.pass_order), index
        if self._pixels is None:
            size = self.split.whole_size or len(self.split)
            self._pixels = _open_cache(self.cache, size, self.image_size, "r")
        return pixels_to_tensor(np.array(self._pixels[self.split.offset + row])), index

    def __getstate__(self) -> dict:  # never pickle an open memory map into a worker
        return {**self.__dict__, "_pixels": None}


# ---------------------------------------------------------------------------------------------------------------------
# The disk cache (--cache disk): every image decoded and resized once, stored as uint8, memory-mapped.

_CACHE_CHUNK = 256


def split_fingerprint(split: Split) -> str:
    """A short hash of a split's image list: names the files cached per split (pixels, LinearInit's features)."""
    return hashlib.sha1(b"\n".join(str(n).encode() for n in split.image_names)).hexdigest()[:12]


def disk_cache_path(split: Split, image_size: int, root: str | os.PathLike) -> Path:
    return Path(root) / "cache" / f"{split_fingerprint(split)}_{image_size}px.u8"


def _open_cache(path: Path, num_images: int, image_size: int, mode: str) -> np.ndarray:
    """The cache's pixels, memory-mapped; an existing cache file (mode ``r``/``r+``) of another size than its images
    take (cut short, or changed after it was built) is a DataError that says to delete it."""
    if mode != "w+" and path.exists() and not _cache_size_ok(path, num_images, image_size):
        need = _cache_bytes(num_images, image_size)
        raise DataError(
            f"The disk cache {path} holds {path.stat().st_size} bytes, not the {num_images} x {image_size} x "
            f"{image_size} x 3 = {need} its images take: it was cut short or changed after it was built. Delete {path} "
            "and run again: the next run builds it anew."
        )
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(num_images, image_size, image_size, 3))


def _cache_bytes(num_images: int, image_size: int) -> int:
    """The size of a cache file: ``num_images`` x S x S x 3 bytes (S: ``image_size``)."""
    return num_images * image_size * image_size * 3


def _cache_size_ok(path: Path, num_images: int, image_size: int) -> bool:
    """Whether the cache file holds exactly ``_cache_bytes`` bytes."""
    try:
        return path.stat().st_size == _cache_bytes(num_images, image_size)
    except OSError:
        return False


def _cache_done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done.npy")


def disk_cache_complete(path: Path, num_images: int, image_size: int) -> bool:
    """The cache file is there, of the size its images take (``_cache_size_ok``), and every image is marked done: a
    file cut short behind an intact bitmap is not complete."""
    done = _cache_done(path, num_images)
    return done is not None and bool(done.all()) and _cache_size_ok(path, num_images, image_size)


def _cache_done(path: Path, num_images: int) -> np.ndarray | None:
    """The cache's bitmap of finished images; None when absent, unreadable or of another size (start over)."""
    done_path = _cache_done_path(path)
    try:
        done = np.load(done_path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return done if done.shape == (num_images,) and done.dtype == bool else None


_worker_cache: dict = {}


def _cache_worker_init(path: Path, split: Split, image_size: int) -> None:
    _worker_cache.update(pixels=_open_cache(path, len(split), image_size, "r+"), split=split, size=image_size)


def _cache_fill(indices: np.ndarray) -> np.ndarray:
    pixels, split, size = _worker_cache["pixels"], _worker_cache["split"], _worker_cache["size"]
    for i in indices:
        pixels[i] = load_image(split.image_path(int(i)), size)
    pixels.flush()
    return indices


def build_disk_cache(split: Split, image_size: int, path: Path, num_workers: int, on_chunk=None) -> Path:
    """Decode and resize every image of ``split`` once into ``path`` (N x S x S x 3 uint8, memory-mapped), in
    ``num_workers`` processes, with a progress bar. Resumable: a bitmap of finished images is saved after every chunk,
    so an interrupted build continues where it stopped. Announces the size first and refuses when the disk is short.
    ``on_chunk(done_count)`` is called after each chunk (tests use it to interrupt a build)."""
    n = len(split)
    if disk_cache_complete(path, n, image_size):
        return path
    lock = path.with_name(path.name + ".lock")
    with files.data_lock(path.parent, f"The disk cache {path} (being built)", lock_file=lock):
        return _build_disk_cache(split, image_size, path, num_workers, on_chunk)


def _build_disk_cache(split: Split, image_size: int, path: Path, num_workers: int, on_chunk) -> Path:
    n = len(split)
    if disk_cache_complete(path, n, image_size):  # built by the process that held the lock before
        return path
    need = _cache_bytes(n, image_size)
    done_path = _cache_done_path(path)
    # A cache file that is missing or of another size (cut short) starts over, whatever its bitmap says.
    fresh = not _cache_size_ok(path, n, image_size)
    if fresh and path.exists():
        print(
            f"disk cache: {path} holds {path.stat().st_size} bytes, not the {need} its images take (cut short?): "
            "building it anew"
        )
    done = None if fresh else _cache_done(path, n)
    done = np.zeros(n, dtype=bool) if done is None else done
    free = shutil.disk_usage(path.parent).free + (path.stat().st_size if path.exists() else 0)
    print(
        f"disk cache: {n} images x {image_size}x{image_size}x3 = {need / 1e9:.2f} GB in {path} "
        f"({int(done.sum())} already done; {free / 1e9:.1f} GB free)"
    )
    if need > free - 2**30:
        raise DataError(
            f"The disk cache needs {need / 1e9:.2f} GB in {path.parent}, but only {free / 1e9:.2f} GB are "
            "free (keeping 1 GB spare). Free some space, or train without --cache disk."
        )
    if fresh:
        done_path.unlink(missing_ok=True)  # never a stale bitmap beside a new, empty file
        _open_cache(path, n, image_size, "w+").flush()
    todo = np.flatnonzero(~done)
    chunks = [todo[i : i + _CACHE_CHUNK] for i in range(0, len(todo), _CACHE_CHUNK)]
    pool = None
    if num_workers > 0:
        pool = multiprocessing.get_context("fork").Pool(num_workers, _cache_worker_init, (path, split, image_size))
        finished = pool.imap_unordered(_cache_fill, chunks)
    else:
        _cache_worker_init(path, split, image_size)
        finished = map(_cache_fill, chunks)
    try:
        with tqdm(total=n, initial=int(done.sum()), desc="disk cache", unit="img") as bar:
            for indices in finished:
                done[indices] = True
                files.save_npy_atomic(done_path, done)
                bar.update(len(indices))
                if on_chunk is not None:
                    on_chunk(int(done.sum()))
    finally:
        if pool is not None:
            pool.terminate()
        files.save_npy_atomic(done_path, done)
    return path


def to_model_input(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalised float: ``RandomHorizontalFlip`` (where ``flip``), ``ToTensor``, ``Normalize``.
    Same arithmetic as torchvision's transforms, run on whatever device the batch is on; channels-last layout, which
    the convolutions run fastest on (CPU and GPU alike), and in which the loader's batches already arrive."""
    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    x = images.float().div(255)
    mean, std = _normalisation(x.device)
    return x.sub(mean).div(std).contiguous(memory_format=torch.channels_last)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as 1 x 3 x 1 x 1 tensors on ``device``, made once per device (a host-to-device copy
    per batch would make the host wait for the GPU)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return mean.to(device), std.to(device)


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 16 + stream)


class EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch, a pure function of (seed, epoch): a seeded permutation (or the natural order) cut
    into batches of ``batch_size``, the last one smaller (``drop_last=False`` as the paper). Also draws each image's
    horizontal flip for the epoch, so batch order and augmentation never depend on workers or processes.

    Under torchrun (``world > 1``) the batches are the same global batches and each process yields its contiguous
    share of each (``distributed.share``); ``global_sizes`` are the global batches' sizes.
    """

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.flips = torch.rand(self.num_items, generator=_epoch_generator(self.seed, epoch, 1)) < 0.5
        self.global_sizes = [len(batch) for batch in self._global_batches()]

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=_epoch_generator(self.seed, self.epoch, 0))
        else:
            order = torch.arange(self.num_items)
        return list(order.split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.num_items // self.batch_size)

    def __iter__(self):
        for batch in self._global_batches():
            yield batch.tolist() if self.world == 1 else distributed.share(batch.numpy(), self.rank, self.world)


# Evaluation has no gradients and BatchNorm in eval mode: the model scores batches of EVAL_BATCH_FACTOR x bsize
# images (same scores, fewer launches); the loader still delivers batches of bsize, joined on the device
# (``evaluation.predict``), so that the workers' first batches arrive as soon as during training.
EVAL_BATCH_FACTOR = 4


def make_loaders(
    parts: dict[str, tuple[Split, bool, Path | None]], cfg, *, pin_memory: bool, ctx=None, eval_resize: str = "workers"
) -> dict:
    """Batches of ``(uint8 images, row indices)`` of each split in ``parts`` (name -> (split, train, disk cache or
    None)), in ``EpochBatches`` order, all from one pool of ``cfg.num_workers`` worker processes: pinned memory for the
    copy to the GPU, workers kept for the whole run and several batches prefetched. One pool, not one per split: no
    split waits for its own workers to start (the test split's would start only for the final test), and a CUDA graph
    captured after the first training batch never sees a worker forked after it (``trainstep.py``). Training batches
    are shares of the global batches under torchrun (``ctx``).

    With ``eval_resize="device"`` the workers of the splits that are not trained on (and have no disk cache) only
    decode: their batches are ``resize.DecodedBatch``es (``batch_to_device``). ``resize.ResizeUnavailable`` if the
    installed Pillow resizes differently from ``resize.py``.

    Returns name -> ``SplitLoader``, iterated like a DataLoader; iterate one at a time (each new iteration ends the
    previous one)."""
    samplers, items = [], []
    for split, train, cache in parts.values():
        rank, world = (ctx.rank, ctx.world) if (train and ctx is not None) else (0, 1)
        samplers.append(EpochBatches(len(split), cfg.bsize, shuffle=train, seed=cfg.seed, rank=rank, world=world))
        order = resize.checked_pass_order() if eval_resize == "device" and not train and cache is None else None
        items.append(ImageDataset(split, cfg.image_size, cache, order))
    workers = cfg.num_workers
    pool = torch.utils.data.DataLoader(
        _PoolItems(items),
        batch_sampler=_PoolBatches(samplers),
        collate_fn=collate_images,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return {name: SplitLoader(pool, part) for part, name in enumerate(parts)}


def make_loader(
    split: Split, cfg, *, train: bool, pin_memory: bool, cache: Path | None = None, ctx=None, eval_resize="workers"
):
    """One split's loader (``make_loaders`` with one part)."""
    parts = {"split": (split, train, cache)}
    return make_loaders(parts, cfg, pin_memory=pin_memory, ctx=ctx, eval_resize=eval_resize)["split"]


class SplitLoader:
    """One split's batches from a shared DataLoader (``make_loaders``): ``len``, iteration and ``batch_sampler`` (the
    split's ``EpochBatches``) as a DataLoader's."""

    def __init__(self, pool: torch.utils.data.DataLoader, part: int) -> None:
        self.pool, self.part = pool, part
        self.batch_sampler: EpochBatches = pool.batch_sampler.samplers[part]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        self.pool.batch_sampler.part = self.part  # read when the pool's iteration starts, below
        return iter(self.pool)


class _PoolItems(torch.utils.data.Dataset):
    """Several splits' ``ImageDataset``s behind one set of workers: item ``(part, index)`` is ``parts[part][index]``."""

    def __init__(self, parts: list[ImageDataset]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        part, index = key
        return self.parts[part][index]


class _PoolBatches(torch.utils.data.Sampler):
    """The batches of the part being iterated (``part``), as ``(part, index)`` keys."""

    def __init__(self, samplers: list[EpochBatches]) -> None:
        self.samplers, self.part = samplers, 0

    def __len__(self) -> int:
        return len(self.samplers[self.part])

    def __iter__(self):
        part = self.part
        for batch in self.samplers[part]:
            yield [(part, index) for index in batch]
