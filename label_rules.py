"""The observed-label rules and the label containers: which entries of a label matrix a run observes (the official
generator and the other regimes), the 80/20 split and subsampling, and OpenImages' sparse labels. Pure, seeded
functions of a label matrix, tested without any image; ``DataError`` is the error every data module raises for a
problem the user can fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import files

OBSERVED_SEED = 1200  # the official generator's seed, fresh for each split file


class DataError(Exception):
    """A problem with the user's data that the user can fix; the message says what and how."""


def load_npy(path: Path, fix: str) -> np.ndarray:
    """``np.load`` without pickles, every failure a DataError naming the file, what is wrong and ``fix``."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"Missing {path}. {fix}") from None
    except PermissionError:
        raise
    except EOFError:
        raise DataError(f"{path} is empty (zero bytes or cut short). {fix}") from None
    except (ValueError, OSError) as err:
        reason = (
            "it holds Python objects (a pickle), which are never loaded"
            if "pickle" in str(err) or "Object arrays" in str(err)
            else f"it is cut short or damaged ({err})"
        )
        raise DataError(f"{path} is not a readable numpy array: {reason}. {fix}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DataError(f"{path} is an .npz archive, not a single .npy array. {fix}")
    return array


# ---------------------------------------------------------------------------------------------------------------------
# The official rules (pure functions).


def _signed_dtype(dtype: np.dtype) -> np.dtype:
    """The input's dtype when it can hold -1 (float, signed int), else int8: bool or unsigned labels must never turn
    -1 into True or overflow."""
    return dtype if dtype.kind in "fi" else np.dtype(np.int8)


def observe_labels(
    label_matrix: np.ndarray, num_pos: int = 1, num_neg: int = 0, seed: int = OBSERVED_SEED
) -> np.ndarray:
    """The official observed-label generator, element for element.

    0 is mapped to -1; one ``RandomState(seed)`` serves every row in order: shuffle the row's positive indices and keep
    the first ``num_pos`` as +1, then shuffle its negative indices (always, even when ``num_neg`` is 0, because that
    consumes random state) and keep the first ``num_neg`` as -1. Everything else is 0 (unobserved). The output keeps
    the input's dtype, like the official files (int8 for bool or unsigned input, which cannot hold -1).
    """
    if num_pos < 0 or num_neg < 0:
        raise ValueError("num_pos and num_neg must be >= 0")
    signed = np.where(label_matrix > 0, 1, -1).astype(_signed_dtype(label_matrix.dtype))
    observed = np.zeros_like(signed)
    rng = np.random.RandomState(seed)
    for i in range(signed.shape[0]):
        for value, count in ((1, num_pos), (-1, num_neg)):
            idx = np.nonzero(signed[i] == value)[0]
            rng.shuffle(idx)
            observed[i, idx[:count]] = value
    return observed


# HCP-MLR-PL's seed for its known-label-proportion files (``changeLabelProportion``: ``np.random.seed(0)``), on which
# SST, SARB and HST trained: ``--label_proportion_seed 0`` draws exactly their mask.
HCP_MLR_PL_SEED = 0


def observe_label_proportion(label_matrix: np.ndarray, proportion: float, seed: int = OBSERVED_SEED) -> np.ndarray:
    """Each label of each image known with probability ``proportion``, positives and negatives alike: known positives
    +1, known negatives -1, the rest 0 (the known-label-proportion regime of Durand et al., CVPR 2019, who released no
    generator; the draw is that of HCP-MLR-PL's ``changeLabelProportion``, github.com/HCPLab-SYSU/HCP-MLR-PL).

    Draw order, as theirs: one ``RandomState(seed)`` per label file, N x C uniforms in one call, assigned in row-major
    order (row 0's classes 0..C-1, then row 1, ...); entry (i, c) is known when its uniform is ``< proportion``. Their
    global ``np.random.seed(0); np.random.random((N, C))`` is ``RandomState(0).random_sample(N * C)`` reshaped, so
    with ``seed=HCP_MLR_PL_SEED`` the known entries equal theirs for the same N x C matrix in the same row order (the
    mask depends only on the shape). The default seed is the official single-positive generator's. The output dtype
    follows ``observe_labels``.
    """
    if not 0 < proportion <= 1:
        raise ValueError("proportion must lie in (0, 1]")
    signed = np.where(label_matrix > 0, 1, -1).astype(_signed_dtype(label_matrix.dtype))
    known = np.random.RandomState(seed).random_sample(signed.size).reshape(signed.shape) < proportion
    return np.where(known, signed, 0).astype(signed.dtype)


@dataclass(frozen=True)
class Regime:
    """How the observed training labels are drawn from the full labels. The default, one positive per image and no
    negative, is the paper's (single positive) and the only regime it reports."""

    num_pos: int = 1
    num_neg: int = 0
    proportion: float | None = None  # when set: each label known with this probability (num_pos/num_neg unused)
    proportion_seed: int = OBSERVED_SEED  # the proportion draw's seed (HCP_MLR_PL_SEED: HCP-MLR-PL's files)

    @property
    def tag(self) -> str:
        """Empty for the paper's regime; ``p2n1`` (2 positives, 1 negative), ``prop0.3`` or, with another seed than
        the default, ``prop0.3_seed0`` otherwise (files of different draws never mix)."""
        if self.proportion is not None:
            seed = "" if self.proportion_seed == OBSERVED_SEED else f"_seed{self.proportion_seed}"
            return f"prop{self.proportion:g}{seed}"
        return "" if (self.num_pos, self.num_neg) == (1, 0) else f"p{self.num_pos}n{self.num_neg}"

    def file(self, phase: str) -> str:
        """The observed-label file: the official name for the paper's regime (files from the official tools are used
        unchanged), its own name for any other, so regimes never mix."""
        return f"formatted_{phase}_labels_obs{'_' + self.tag if self.tag else ''}.npy"

    def describe(self) -> str:
        if self.proportion is not None:
            seed = "" if self.proportion_seed == OBSERVED_SEED else f" (seed {self.proportion_seed})"
            return f"each label known with probability {self.proportion:g}{seed}"
        if (self.num_pos, self.num_neg) == (1, 0):
            return "single positive (the paper's regime)"
        return f"{self.num_pos} positive(s) and {self.num_neg} negative(s) per image"

    def observe(self, labels: np.ndarray) -> np.ndarray:
        if self.proportion is not None:
            return observe_label_proportion(labels, self.proportion, self.proportion_seed)
        return observe_labels(labels, self.num_pos, self.num_neg)


def regime_of(cfg) -> Regime:
    """The regime a config asks for: ``cfg.num_pos`` (default 1), ``cfg.num_neg`` (0), ``cfg.label_proportion``
    (None: off). Raises DataError naming the flag for an impossible combination."""
    num_pos, num_neg = getattr(cfg, "num_pos", 1), getattr(cfg, "num_neg", 0)
    proportion = getattr(cfg, "label_proportion", None)
    if proportion is not None:
        if (num_pos, num_neg) != (1, 0):
            raise DataError(
                "--label_proportion draws every label with one probability; it cannot be combined with "
                "--num_pos or --num_neg. Give one or the other."
            )
        if not 0 < proportion <= 1:
            raise DataError(f"--label_proportion must lie in (0, 1] (got {proportion}).")
        seed = int(getattr(cfg, "label_proportion_seed", OBSERVED_SEED))
        return Regime(proportion=float(proportion), proportion_seed=seed)
    if num_pos < 0 or num_neg < 0 or num_pos + num_neg == 0:
        raise DataError(
            f"--num_pos {num_pos} --num_neg {num_neg} observes no label: both must be >= 0 and at least "
            "one positive (the paper: --num_pos 1 --num_neg 0)."
        )
    return Regime(int(num_pos), int(num_neg))


def split_indices(num_images: int, val_frac: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The official train/val split of the official train split: sorted index arrays (train, val)."""
    n_val = int(np.round(val_frac * num_images))
    if not 0 < n_val < num_images:
        if num_images < 2:
            raise DataError(
                f"The official train split has {num_images} image(s): too few to hold out a validation "
                "split. Check the formatted train files."
            )
        part = "validation" if n_val <= 0 else "training"
        raise DataError(
            f"--val_frac {val_frac} leaves an empty {part} split (round({val_frac} x {num_images} images) = {n_val} "
            f"held out). Use a --val_frac between {1 / num_images:.3g} and {1 - 1 / num_images:.3g} (the paper: 0.2)."
        )
    perm = np.random.RandomState(split_seed).permutation(num_images)
    return np.sort(perm[: num_images - n_val]), np.sort(perm[-n_val:])


def subsample_indices(
    train_idx: np.ndarray, val_idx: np.ndarray, frac_train: float, frac_val: float, ss_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The official optional subsampling: one RandomState for train then val, applied even when a fraction is 1."""
    rng = np.random.RandomState(ss_seed)
    out = []
    for idx, frac, flag in ((train_idx, frac_train, "--ss_frac_train"), (val_idx, frac_val, "--ss_frac_val")):
        keep = int(np.round(frac * len(idx)))
        if keep == 0:
            raise DataError(
                f"{flag} {frac} keeps no image: round({frac} x {len(idx)} images) = 0. Use {flag} of at least "
                f"{1 / len(idx):.3g} (1 keeps them all)."
            )
        out.append(idx[np.sort(rng.permutation(len(idx))[:keep])])
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------------
# Sparse labels (OpenImages).


class SparseLabels:
    """An N x C matrix of -1/0/+1 labels stored as CSR: per row, the annotated classes and their values.

    0 means unknown and is not stored. Rows are densified per batch (``dense``), so the whole matrix never is.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, num_classes: int) -> None:
        self.indptr, self.indices, self.values, self.num_classes = indptr, indices, values, num_classes

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.num_classes)

    @classmethod
    def from_entries(cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_rows: int, num_classes: int):
        """From (row, class, value) triples in any order; a duplicated entry keeps its largest value."""
        order = np.lexsort((-values.astype(np.int16), cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        rows, cols, values = rows[first], cols[first], values[first]
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
        return cls(
            indptr, cols.astype(np.int16 if num_classes < 2**15 else np.int32), values.astype(np.int8), num_classes
        )

    def rows(self, idx: np.ndarray) -> SparseLabels:
        """The sub-matrix of the given rows, in that order."""
        starts, ends = self.indptr[idx], self.indptr[np.asarray(idx) + 1]
        lengths = ends - starts
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return SparseLabels(indptr, self.indices[take], self.values[take], self.num_classes)

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, class, value) of every stored entry."""
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        return rows, self.indices.astype(np.int64), self.values

    def dense(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as a dense int8 len(idx) x C array."""
        sub = self.rows(np.asarray(idx))
        out = np.zeros((len(idx), self.num_classes), dtype=np.int8)
        rows, cols, values = sub.entries()
        out[rows, cols] = values
        return out

    def positives_per_class(self) -> np.ndarray:
        return np.bincount(self.indices[self.values > 0].astype(np.int64), minlength=self.num_classes)

    def with_positives(self, rows: np.ndarray, cols: np.ndarray) -> SparseLabels:
        """A copy where the given entries are +1 (LL-Cp's permanent corrections)."""
        all_rows, all_cols, all_values = self.entries()
        return SparseLabels.from_entries(
            np.concatenate([all_rows, rows]),
            np.concatenate([all_cols, cols]),
            np.concatenate([all_values, np.ones(len(rows), dtype=np.int8)]),
            len(self),
            self.num_classes,
        )

    _PARTS = ("indptr", "indices", "values")

    @staticmethod
    def files(phase: str) -> list[str]:
        return [f"formatted_{phase}_labels_{part}.npy" for part in SparseLabels._PARTS]

    def save(self, root: Path, phase: str) -> None:
        for name, part in zip(self.files(phase), self._PARTS, strict=True):
            files.save_npy_atomic(root / name, getattr(self, part))

    @classmethod
    def load(cls, root: Path, phase: str, num_classes: int) -> SparseLabels:
        paths = [root / name for name in cls.files(phase)]
        fix = (
            f"Delete {', '.join(str(p) for p in paths)} and format again from the raw annotations "
            "(data/openimages/README.md)."
        )
        parts = [load_npy(path, fix) for path in paths]
        indptr, indices, values = parts
        ok = (
            indptr.ndim == indices.ndim == values.ndim == 1
            and len(indptr) > 0
            and indptr[0] == 0
            and all(p.dtype.kind in "iu" for p in parts)
            and len(indices) == len(values) == indptr[-1]
            and (np.diff(indptr) >= 0).all()
            and np.isin(values, (-1, 1)).all()
            and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < num_classes))
        )
        if not ok:
            raise DataError(f"The sparse label files formatted_{phase}_labels_*.npy in {root} are inconsistent. {fix}")
        return cls(*parts, num_classes)
