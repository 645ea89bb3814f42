"""The trainer's label stores: the training split's observed labels by row on the device (dense, or OpenImages'
sparse labels), LL-Cp's permanent corrections, and the methods' per-image state (``LabelState``), checkpointed with
the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import datasets
import distributed
import label_rules
import models

if TYPE_CHECKING:
    from registry import Method

# ---------------------------------------------------------------------------------------------------------------------
# The trainer's label stores: observed labels by row, LL-Cp's permanent corrections.


class DenseLabelStore:
    """The observed label matrix on the device; corrections are written in place.

    The matrix is a view of ``N + 1`` stored rows: the extra last row takes the writes of padding rows (a torchrun
    process with no image of its own in a tiny last batch), so a correction never needs a boolean index (which waits
    for the GPU) and never writes the same row twice in one step."""

    def __init__(self, observed: np.ndarray, device: torch.device) -> None:
        self._storage = torch.zeros((observed.shape[0] + 1, *observed.shape[1:]), dtype=torch.int8, device=device)
        self._storage[:-1] = torch.from_numpy(np.asarray(observed, dtype=np.int8)).to(device)
        self.matrix = self._storage[:-1]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def batch(self, rows: torch.Tensor, host_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The labels of ``rows`` (on the device; ``host_rows``, the same rows on the host, serve the sparse store)."""
        return self.matrix[rows.to(self.device, non_blocking=True)]

    def correct(self, rows: torch.Tensor, selected: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Set the ``selected`` entries of ``rows`` to +1 (LL-Cp's permanent correction). ``real``: which rows are
        real (padding rows write into the spare row instead). Integer indexing only: nothing waits for the GPU."""
        rows = rows.to(self.device, non_blocking=True)
        if real is not None:
            rows = torch.where(real, rows, self.matrix.shape[0])
        self._storage[rows] = self._storage[rows].masked_fill(selected, 1)

    def end_epoch(self) -> None:
        pass

    def num_positive(self) -> int:
        return int((self.matrix == 1).sum())

    def state(self) -> dict:
        return {"matrix": self.matrix.cpu()}

    def load_state(self, state: dict) -> None:
        self.matrix.copy_(state["matrix"].to(self.device, torch.int8))

    def checksum(self) -> float:
        weights = torch.arange(self.matrix.numel(), device=self.device).remainder(9973).add(1).view_as(self.matrix)
        return float((self.matrix.double() * weights).sum())


class SparseLabelStore:
    """Sparse observed labels (OpenImages), densified per batch. Corrections are buffered and merged at the end of the
    epoch: every row is seen once per epoch, so no batch of the same epoch could have read them anyway."""

    FLUSH_EVERY = 32  # steps whose corrections are read back to the host together

    def __init__(self, observed: label_rules.SparseLabels, device: torch.device) -> None:
        self.labels, self.device = observed, device
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.queued: list[tuple[torch.Tensor, torch.Tensor]] = []

    def batch(self, rows: torch.Tensor, host_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Densify the rows on the host (``host_rows``: no read-back from the GPU) and copy them from pinned memory."""
        host_rows = rows.cpu() if host_rows is None else host_rows
        dense = torch.from_numpy(self.labels.dense(host_rows.numpy()))
        if self.device.type == "cuda":
            dense = dense.pin_memory()
        return dense.to(self.device, non_blocking=True)

    def correct(self, rows: torch.Tensor, selected: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Queue the corrections on the device; they are read back in groups of ``FLUSH_EVERY`` steps (one
        synchronisation per group, not per step)."""
        if real is not None:
            selected = selected & real[:, None]
        self.queued.append((rows, selected))
        if len(self.queued) >= self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Read the queued corrections back to the host (this synchronises with the GPU)."""
        for rows, selected in self.queued:
            r, c = selected.nonzero(as_tuple=True)
            self.pending.append((rows.cpu().numpy()[r.cpu().numpy()], c.cpu().numpy()))
        self.queued = []

    def end_epoch(self) -> None:
        self._flush()
        if self.pending:
            rows, cols = (np.concatenate(parts) for parts in zip(*self.pending, strict=True))
            self.labels = self.labels.with_positives(rows, cols)
            self.pending = []

    def num_positive(self) -> int:
        return int((self.labels.values > 0).sum())

    def state(self) -> dict:
        return {
            part: torch.from_numpy(np.ascontiguousarray(getattr(self.labels, part)))
            for part in label_rules.SparseLabels._PARTS
        }

    def load_state(self, state: dict) -> None:
        parts = [state[part].numpy() for part in label_rules.SparseLabels._PARTS]
        self.labels = label_rules.SparseLabels(*parts, self.labels.num_classes)

    def checksum(self) -> float:
        return float(
            sum(
                np.asarray(getattr(self.labels, p), dtype=np.float64).sum() * (i + 1)
                for i, p in enumerate(label_rules.SparseLabels._PARTS)
            )
        )


def label_store(observed, device: torch.device) -> DenseLabelStore | SparseLabelStore:
    """A dense store for a label matrix, a sparse one for ``label_rules.SparseLabels`` (OpenImages)."""
    if isinstance(observed, label_rules.SparseLabels):
        return SparseLabelStore(observed, device)
    return DenseLabelStore(observed, device)


@dataclass
class LabelState:
    """The training labels as the trainer owns them, plus the per-image state some methods learn.

    ``observed`` is read per batch and takes LL-Cp's corrections. ``initial`` (the observed labels before any
    correction) and ``clean`` (the full labels) exist when the full labels are known (not on sparse datasets): they
    feed the diagnostics only, never the loss. ``extra`` holds the methods' own per-image state by name (ROLE's
    ``estimator``; EM+APL's ``pseudo_negative``, ``soft_label`` and ``apl_quota``), made by their ``init_state``
    hooks; ``hooks`` are the active registry entries whose ``save_state`` / ``load_state`` go into checkpoints.
    """

    observed: DenseLabelStore | SparseLabelStore
    initial: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    hooks: tuple[Method, ...] = ()
    train_split: datasets.Split | None = None  # the images the rows refer to (for state read from per-image files)

    @property
    def estimator(self) -> models.LabelEstimator | None:
        """ROLE's label estimator (None for the other methods)."""
        return self.extra.get("estimator")

    def checkpoint(self) -> dict:
        """What a checkpoint must hold to resume exactly: the labels as corrected so far and what the methods learnt
        (``initial``, ``clean`` and anything a method derives from the data are rebuilt)."""
        out = {"observed": self.observed.state()}
        for method in self.hooks:
            if method.save_state is not None:
                out.update(method.save_state(self))
        return out

    def restore(self, saved: dict) -> None:
        self.observed.load_state(saved["observed"])
        for method in self.hooks:
            if method.load_state is not None:
                method.load_state(self, saved)


def same_on_all_processes(state: LabelState, ctx) -> bool:
    """Whether every process holds the same training labels (LL-Cp's corrections must be applied identically)."""
    checksum = torch.tensor([state.observed.checksum()], dtype=torch.float64, device=state.observed.device)
    gathered = distributed.gather_rows(checksum, ctx)
    return bool((gathered == gathered[0]).all())
