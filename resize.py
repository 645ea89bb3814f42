"""PIL's bilinear resize, pixel for pixel, on any torch device (``--eval_resize device``).

The paper's loader resizes every image with PIL (``Resize((448, 448))``, bilinear) in the data loader's workers, and on
a GPU machine those workers bound evaluation; the resize is about half of a worker's time per image (decoding most of
the rest). PIL's 8-bit resize is integer arithmetic, so it can be reproduced exactly elsewhere:

- per output pixel, a row of weights over the input pixels it covers (``coefficients``: computed in double precision
  exactly as PIL does, then rounded to 22-bit fixed point);
- two separable passes, each ``(sum(weight * pixel) + 2**21) >> 22`` clipped to 0..255 and stored as 8 bits;
- the order of the passes, which changes the result through the 8-bit intermediate image: horizontal first in older
  Pillow; since the change that makes Pillow resize an image vertically first when its height shrinks by more than
  twice as many pixels as its width (Pillow 13 here), that order for those images (``PASS_ORDERS``).

Workers only decode (``Decoded``); ``DecodedBatch`` carries a batch at its own sizes, with the weights, to the device,
where ``DecodedBatch.resize`` gives the batch ``loaders.load_image`` would have given. ``pass_order`` checks the
installed Pillow against this module on probe images and says which order rule it follows (``None``: neither, and
the device resize must not be used).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling: 32 bits - 8 for the value - 2 for the sign and overflow


def _horizontal_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    return False


def _tall_reductions_vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    return out_height < height and height - out_height > 2 * (width - out_width)


# Which images a Pillow version resizes vertically first: (width, height, out_width, out_height) -> bool.
PASS_ORDERS: dict[str, Callable[[int, int, int, int], bool]] = {
    "horizontal first": _horizontal_first,
    "vertical first when the height shrinks by more than twice the width's pixels": _tall_reductions_vertical_first,
}


@functools.lru_cache(maxsize=4096)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear weights for resizing one axis from ``in_size`` to ``out_size`` pixels: (first input pixel of
    each output pixel, int64 [out_size]; 22-bit fixed-point weights, int32 [out_size, taps], zero beyond each output
    pixel's own taps). The same double-precision steps as PIL's ``precompute_coeffs`` (support, centre, bounds,
    normalisation by the weights' sum in order), then its rounding to fixed point."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    taps = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inverse = 1.0 / filterscale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    weights = np.zeros((out_size, taps), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(taps):  # one tap at a time: the sum runs in PIL's order, bit for bit
        t = np.abs(((k + first) - center + 0.5) * inverse)
        w = np.where((k < count) & (t < 1.0), 1.0 - t, 0.0)
        weights[:, k] = w
        total = total + w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    fixed = np.trunc(0.5 + weights * (1 << PRECISION_BITS)).astype(np.int32)  # all weights are >= 0
    return first, fixed


@functools.cache
def pass_order(probes: int = 24) -> str | None:
    """The key of ``PASS_ORDERS`` that the installed Pillow follows, found by resizing ``probes`` random images of
    shapes on both sides of each rule with PIL and with this module (on the CPU) and comparing every pixel; ``None``
    when no rule gives PIL's pixels on all of them. Cached: the answer cannot change within a process."""
    rng = np.random.default_rng(0)
    shapes = [
        (64, 40, 32, 32),
        (40, 64, 32, 32),
        (33, 58, 32, 32),
        (58, 33, 32, 32),
        (20, 30, 32, 32),
        (30, 20, 32, 32),
        (50, 50, 70, 20),
        (50, 50, 20, 70),
        (90, 30, 32, 32),
        (30, 90, 32, 32),
        (32, 45, 32, 32),
        (45, 32, 32, 32),
        (1, 1, 32, 32),
        (200, 150, 32, 32),
    ]
    while len(shapes) < probes:
        shapes.append(tuple(int(v) for v in rng.integers(1, 120, size=4)))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h, _, _ in shapes]
    expected = [
        np.asarray(Image.fromarray(a).resize((ow, oh), Image.BILINEAR))
        for a, (_, _, ow, oh) in zip(images, shapes, strict=True)
    ]
    for name, rule in PASS_ORDERS.items():
        got = [
            resize_image(torch.from_numpy(a), ow, oh, rule(w, h, ow, oh)).numpy()
            for a, (w, h, ow, oh) in zip(images, shapes, strict=True)
        ]
        if all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True)):
            return name
    return None


class ResizeUnavailable(Exception):
    """The installed Pillow resizes differently from this module (``pass_order`` found no rule): the device resize
    would not give the paper's pixels."""


def checked_pass_order() -> str:
    """``pass_order()``, or ``ResizeUnavailable`` with what to do."""
    order = pass_order()
    if order is None:
        import PIL

        raise ResizeUnavailable(
            f"--eval_resize device: the installed Pillow {PIL.__version__} resizes differently from this project's "
            "device resize (checked on probe images at start), so it would not give the paper's pixels. Use "
            "--eval_resize workers (the default)."
        )
    return order


def _resample(pixels: torch.Tensor, dim: int, first: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One pass along ``dim`` (1: rows, 2: columns) of uint8 N x H x W x C: PIL's ``(sum(w * p) + 2**21) >> 22``,
    clipped to 8 bits, accumulated in int32 (at most 255 * 2**22 per product, and the weights of a pixel sum to about
    2**22). The taps are gathered one at a time, as uint8 (``first + k``, clamped to the image: those taps weigh 0),
    and multiplied into the sum in one step (``addcmul_``), so memory traffic stays at a few 8-bit copies of the image
    and one int32 sum."""
    n, out, taps = weights.shape
    limit = pixels.shape[dim] - 1
    shape = list(pixels.shape)
    shape[dim] = out
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=pixels.device)
    for k in range(taps):
        index = (first + k).clamp_(max=limit)
        if dim == 1:
            index, w = index[:, :, None, None], weights[:, :, k, None, None]
        else:
            index, w = index[:, None, :, None], weights[:, None, :, k, None]
        acc.addcmul_(pixels.gather(dim, index.expand(shape)), w)
    return acc.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _passes(pixels: torch.Tensor, tables: dict[str, torch.Tensor], vertical_first: bool) -> torch.Tensor:
    order = ("v", "h") if vertical_first else ("h", "v")
    for axis in order:
        pixels = _resample(pixels, 1 if axis == "v" else 2, tables[f"{axis}_first"], tables[f"{axis}_weights"])
    return pixels


def resize_image(pixels: torch.Tensor, out_width: int, out_height: int, vertical_first: bool) -> torch.Tensor:
    """One H x W x 3 uint8 image resized as PIL's bilinear ``resize((out_width, out_height))`` with the given pass
    order (the batch path's arithmetic, for ``pass_order`` and tests)."""
    h, w = pixels.shape[:2]
    tables = _tables([(w, h)], out_width, out_height, pixels.device)
    return _passes(pixels[None], tables, vertical_first)[0]


def _tables(sizes: list[tuple[int, int]], out_width: int, out_height: int, device=None) -> dict[str, torch.Tensor]:
    """Stacked per-image weights of a group of images of ``sizes`` (width, height), the taps padded to the group's
    widest with zero weights."""
    out = {}
    for axis, size_of, out_size in (("h", 0, out_width), ("v", 1, out_height)):
        parts = [coefficients(s[size_of], out_size) for s in sizes]
        taps = max(p[1].shape[1] for p in parts)
        weights = np.zeros((len(parts), out_size, taps), dtype=np.int32)
        for i, (_, w) in enumerate(parts):
            weights[i, :, : w.shape[1]] = w
        out[f"{axis}_first"] = torch.from_numpy(np.stack([p[0] for p in parts])).to(device)
        out[f"{axis}_weights"] = torch.from_numpy(weights).to(device)
    return out


@dataclass
class Decoded:
    """One image decoded at its own size, to be resized to ``size`` x ``size`` on the device (a worker's item)."""

    pixels: np.ndarray  # H x W x 3 uint8
    size: int
    vertical_first: bool


MAX_PADDING = 1.5  # a group's padded pixels at most this many times its images' own


def padding_groups(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of ``shapes`` (height, width) in groups whose padding to the group's largest height and width costs at
    most ``MAX_PADDING`` times the images' own pixels: one group when the sizes are alike (a COCO batch: 640x480 and
    640x427), more when one image is far larger than the rest (it would make every other image as large in the
    pinned and the device memory). Greedy, largest image first."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1], reverse=True)
    groups: list[list[int]] = []
    for i in order:
        for group in groups:
            members = [*group, i]
            height, width = max(shapes[j][0] for j in members), max(shapes[j][1] for j in members)
            if len(members) * height * width <= MAX_PADDING * sum(shapes[j][0] * shapes[j][1] for j in members):
                group.append(i)
                break
        else:
            groups.append([i])
    return [sorted(group) for group in groups]


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when in a DataLoader worker (as ``default_collate`` does: sending it
    to the main process then copies nothing)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class DecodedBatch:
    """A batch of ``Decoded`` images at their own sizes, in groups of one pass order and alike sizes
    (``padding_groups``): the images padded to the group's largest, their weights, their positions in the batch.
    Pinned, moved and resized like a tensor batch: ``pin_memory()`` (the DataLoader's pinning thread calls it),
    ``to(device, non_blocking=...)``, ``record_stream(stream)``, ``resize()``."""

    def __init__(self, groups: list[tuple[bool, dict[str, torch.Tensor]]], size: int, count: int) -> None:
        self.groups, self.size, self.count = groups, size, count  # groups: (vertical first?, tensors)

    @classmethod
    def collate(cls, images: list[Decoded]) -> DecodedBatch:
        size = images[0].size
        groups = []
        for vertical_first in (False, True):
            members = [i for i, d in enumerate(images) if d.vertical_first == vertical_first]
            for group in padding_groups([images[i].pixels.shape[:2] for i in members]):
                positions = [members[g] for g in group]
                groups.append((vertical_first, cls._group([images[p] for p in positions], positions)))
        return cls(groups, size, len(images))

    @staticmethod
    def _group(images: list[Decoded], positions: list[int]) -> dict[str, torch.Tensor]:
        """Images of one pass order padded to the largest of them, their weights and their positions in the batch."""
        size = images[0].size
        heights = [d.pixels.shape[0] for d in images]
        widths = [d.pixels.shape[1] for d in images]
        pixels = _shared_empty((len(images), max(heights), max(widths), 3), torch.uint8)
        for row, d in enumerate(images):
            pixels[row, : heights[row], : widths[row]] = torch.from_numpy(d.pixels)
        group = _tables(list(zip(widths, heights, strict=True)), size, size)
        group.update(pixels=pixels, positions=torch.tensor(positions))
        return group

    def __len__(self) -> int:
        return self.count

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DecodedBatch:
        groups = [(order, {k: fn(v) for k, v in g.items()}) for order, g in self.groups]
        return DecodedBatch(groups, self.size, self.count)

    def pin_memory(self, device=None) -> DecodedBatch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> DecodedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream) -> None:
        """``Tensor.record_stream`` for every tensor of the batch (a copy made on a side stream, used on another)."""
        for _, g in self.groups:
            for t in g.values():
                t.record_stream(stream)

    def resize(self) -> torch.Tensor:
        """The batch as ``loaders.load_image`` gives it: uint8 N x 3 x size x size, channels-last strides, on the
        batch's device."""
        device = self.groups[0][1]["pixels"].device
        out = torch.empty((self.count, self.size, self.size, 3), dtype=torch.uint8, device=device)
        for vertical_first, g in self.groups:  # the order is a host bool: it picks the code path without a read-back
            out.index_copy_(0, g["positions"], _passes(g["pixels"], g, vertical_first))
        return out.permute(0, 3, 1, 2)
