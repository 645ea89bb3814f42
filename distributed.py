"""Several processes through torchrun, without changing the algorithm.

Every process sees the same global batches (the single-process order) and takes a contiguous share of each; LL's
selection is made over the whole global batch (the candidate losses are gathered), LL-Cp's corrections are applied
identically on every process, and evaluation gathers each image's scores exactly once. With one process all of this
reduces to the plain single-process code path.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import losses


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()  # one process: what the trainer and evaluation use without torchrun


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(use_cuda: bool) -> Context:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); a plain single-process context otherwise."""
    if not launched_by_torchrun():
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def finish(ctx: Context) -> None:
    """A run that ended well, before ``teardown``: what still holds the process group (DistributedDataParallel's
    reducer, in a reference cycle until the next collection) is freed while the interpreter is fully alive, and no
    process tears the group down while another still uses it (a gloo process aborting at exit with "terminate called
    without an active exception" was seen once). Not after a failure: the other processes may never get here."""
    if ctx.enabled:
        gc.collect()
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(rows: list[int] | np.ndarray, rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes differ by at most one, in rank order).

    A process whose share would be empty (a last batch smaller than the number of processes) gets a copy of the batch's
    first image marked as padding (index ``-1 - i``): it runs the forward and backward pass the others wait for, but
    its loss weight is 0, it is never selected and it is never scored.
    """
    part = np.array_split(np.asarray(rows), world)[rank].tolist()
    return part if part else [-1 - int(rows[0])]


def share_sizes(global_size: int, world: int) -> list[int]:
    """The number of rows each process holds of a global batch of ``global_size`` (``share``), known on the host
    without asking the other processes: a process with no image of its own holds one padding row."""
    return [max(len(part), 1) for part in np.array_split(np.arange(global_size), world)]


def row_counts(num_rows: int, ctx: Context, device: torch.device) -> list[int]:
    """Every process's number of rows, in rank order."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(ctx.world)]
    dist.all_gather(counts, torch.tensor([num_rows], device=device))
    return [int(c) for c in counts]


def gather_rows(tensor: torch.Tensor, ctx: Context, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate every process's rows in rank order (the shares may differ in length). ``counts``: the shares'
    lengths (``row_counts``), when the caller already knows them."""
    if not ctx.enabled:
        return tensor
    if counts is None:
        counts = row_counts(tensor.shape[0], ctx, tensor.device)
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def all_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor)
    return tensor


def broadcast(value: float, ctx: Context, device: torch.device) -> float:
    """Rank 0's value on every process (decisions such as early stopping must agree everywhere)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t)


def broadcast_object(value, ctx: Context):
    """Rank 0's Python object on every process (e.g. a default run name made from the clock, which the processes
    would otherwise each make for themselves)."""
    if not ctx.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


class GlobalSelection:
    """LL's selection over the whole global batch, for one step.

    ``__call__`` gathers every process's loss matrix and candidate mask, selects the k = ceil(B*C*rate) largest
    candidate losses of the global batch (B = the global batch size) exactly as one process would, keeps the global
    mask and row indices (``global_selected``, ``global_rows``: LL-Cp applies them identically on every process) and
    returns this process's slice.
    """

    def __init__(
        self, ctx: Context, global_batch_size: int, rate: float, rows: torch.Tensor, counts: list[int] | None = None
    ) -> None:
        self.ctx, self.global_batch_size, self.rate, self.rows = ctx, global_batch_size, rate, rows
        self.counts = counts  # the shares' row counts (``share_sizes``); asked of the processes when not given
        self.global_selected: torch.Tensor | None = None
        self.global_rows: torch.Tensor | None = None

    def __call__(self, loss_matrix: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        counts = self.counts or row_counts(loss_matrix.shape[0], self.ctx, loss_matrix.device)  # once for 3 gathers
        all_losses = gather_rows(loss_matrix.float(), self.ctx, counts)
        all_candidates = gather_rows(candidates, self.ctx, counts)
        k = losses.num_to_select(self.global_batch_size, loss_matrix.shape[1], self.rate)
        self.global_selected = losses.select_largest(all_losses, all_candidates, k)
        self.global_rows = gather_rows(self.rows, self.ctx, counts)
        start = sum(counts[: self.ctx.rank])
        return self.global_selected[start : start + loss_matrix.shape[0]]
