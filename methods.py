"""What differs between the rows of the paper's table, for the trainer, in one place.

The **method registry** (``REGISTRY``, filled by ``register`` at the end of this file) holds one entry per method:
a baseline loss, an LL scheme, BoostLU, a training mode (LinearInit), the full-label variant. An entry carries the
method's batch loss, its flags with their per-dataset presets (named by dataset), its checks, its per-image state and
checkpoint hooks, its per-epoch hook, where it is not offered, its report row and its published numbers.
``config.py`` builds the flags, presets and checks from it; ``report.py`` and ``scripts/reproduce_table.sh`` read
its rows; ``train.py`` calls the hooks through the functions of the "for the trainer" section. Adding a method is one
``register(Method(...))`` call and its test (docs/extending.md).

Also here: the label stores the trainer reads and corrects, the diagnostics of the memorisation analysis, EM+APL's
pseudo-labelling and LinearInit's frozen-feature phase. The loss maths stays in ``losses.py``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import datasets
import distributed
import files
import label_rules
import loaders
import losses
import losses_vlp
import models
import pseudo_labels

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
        return float(sum(np.asarray(getattr(self.labels, p), dtype=np.float64).sum() * (i + 1) for i, p in
                         enumerate(label_rules.SparseLabels._PARTS)))  # fmt: skip


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


# ---------------------------------------------------------------------------------------------------------------------
# The method registry.

VARIANT, LOSS, SCHEME, MODIFIER, MODE = "variant", "loss", "scheme", "modifier", "mode"
KINDS = (VARIANT, LOSS, SCHEME, MODIFIER, MODE)
# The config field (and flag) that picks the entry of each kind; modifiers are switched on by their own flags.
SELECTOR = {VARIANT: "train_set_variant", LOSS: "loss", SCHEME: "mod_scheme", MODE: "train_mode"}
PLAIN_SCHEME = "AN"  # the scheme that modifies nothing
DEFAULT_SCHEME = "LL-R"  # the paper's method: --mod_scheme's default for AN's loss on the observed labels
OBSERVED = "observed"  # the variant that trains on the observed (partial) labels
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class MethodError(ValueError):
    """An unknown method, or an entry that is not completely registered; the message says which and what is missing."""


class LossInputs(NamedTuple):
    """What a method's batch loss gets. ``observed``: the batch's labels (-1/0/1, B x C); ``rows``: its row indices
    into the training set (for per-image state); ``rate``: LL's modification rate this epoch; ``epoch``: 1-indexed
    (None in LinearInit's linear phase); ``select``, ``reduce``: see ``losses.large_loss`` (set by the trainer when
    the batch spans several processes; a loss that cannot use them must be ``single_process``); ``flip``: the rows the
    loader flipped horizontally (the pseudo-label methods pick the scores of the view the model saw)."""

    cfg: Any
    logits: torch.Tensor
    observed: torch.Tensor
    rows: torch.Tensor
    state: LabelState
    rate: float
    epoch: int | None
    select: losses.Select | None
    reduce: losses.Reduce | None
    flip: torch.Tensor | None = None  # which rows the loader flipped (bool, on the device); None: none was


_NO_DEFAULT = object()


@dataclass(frozen=True)
class FromDataset:
    """A preset that the dataset's entry holds: ``datasets.DATASET_INFO[dataset].method_constants[key][flag]``.
    ``key``: the entry (or table row, ``"LL-R+BoostLU"``) whose constants they are; another entry may read them too
    (ROLE reads EPR's expected number of positives). ``default``: the general value on a dataset whose entry has
    none (GR Loss's released values); without it, running the method there stops and names the flag to give."""

    key: str
    default: Any = _NO_DEFAULT

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


def from_dataset(key: str, default: Any = _NO_DEFAULT) -> FromDataset:
    """A per-dataset preset, read from the dataset entries' ``method_constants[key]`` (see ``FromDataset``)."""
    return FromDataset(key, default)


@dataclass(frozen=True)
class Flag:
    """A command-line flag ``--name`` and the ``Config`` field (and ``config.json`` key) of the same name.

    ``default``: the value when the flag is not given and no preset applies; also what a ``config.json`` written
    before the flag existed is read as. A flag that some entry gives ``presets`` for is resolved from them when it is
    not given (and marked "(preset)"): from the active entries' presets, and, with ``always_preset``, from any
    entry's presets even when no entry using it is active (the flags every run has always recorded, so that older
    run folders resume). ``check(value)``: what is wrong with a value, or None; applied to every config.
    ``nargs``: the flag takes that many values, stored as a tuple.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    nargs: int | None = None
    always_preset: bool = False


@dataclass(frozen=True)
class Method:
    """One method. ``kind``: ``variant`` (``--train_set_variant NAME``), ``loss`` (``--loss NAME``), ``scheme``
    (``--mod_scheme NAME``, modifying the AN loss), ``modifier`` (switched on by its own flags, e.g. BoostLU) or
    ``mode`` (``--train_mode NAME``).

    Report and docs:
        ``title`` (its row's title), ``summary`` (one line for ``--list_methods``), ``row`` (the report's row key;
        by default the name for losses and schemes; None: no row of its own), ``paper`` (published test mAP,
        ``{train_mode: {dataset: value}}``), ``table_skip`` (datasets whose default table in
        ``scripts/reproduce_table.sh`` leaves the row out although it is offered there).
    Config:
        ``flags`` (the flags it owns; share one ``Flag`` object between entries that use the same flag),
        ``presets`` (``{flag: value for every dataset}``, or ``{flag: from_dataset(key)}`` for a value per dataset,
        held by the dataset entries; may name another entry's flag), ``validate(cfg)`` (its own rules, as readable
        problems; run when it is active), ``not_on`` (``{dataset: why}``: refused there).
    Training:
        ``loss(LossInputs)`` (the batch loss, a scalar, or ``(loss, selected)`` for the schemes; required for losses
        and schemes), ``combines_with_schemes`` (a loss that ``--mod_scheme`` may modify: only AN's),
        ``rate(cfg, epoch)`` and ``corrects_labels`` (schemes: the modification rate; LL-Cp's permanent corrections),
        ``single_process`` (why it cannot run under torchrun; empty: it can), ``eager_forward`` (why the model's
        training forward must run as Python every step, e.g. a forward hook or a branch on the data: a CUDA graph
        replays only what its capture recorded; empty: it may be replayed), ``model_options(cfg)`` (keyword arguments
        of ``models.build_model``: BoostLU's ``boostlu_alpha``).
    Per-image state:
        ``init_state(cfg, state)`` (puts its state in ``state.extra``), ``save_state(state) -> dict`` and
        ``load_state(state, saved)`` (checkpoint hooks; both or neither), ``parameters(state)`` (state trained by the
        optimiser at the head's learning rate; kept in ``bestmodel.pt`` too), ``after_epoch(cfg, state, epoch,
        train_scores) -> dict`` (after each end-to-end epoch; ``train_scores()`` scores the training images in row
        order, only when ``scores_train_set``; returns what to log), ``before_training(session, val_map)`` (a phase
        before end-to-end training, on a fresh start).
    Modifiers:
        ``active(cfg)`` (whether the config switches it on), ``cli`` (the flags that do), ``applies_to`` (the schemes
        it makes table rows with), ``presets_with`` (``{scheme: presets}`` that win over the scheme's own) and
        ``paper_with`` (``{scheme: {train_mode: {dataset: value}}}``).
    Run names: ``name_suffix(values)`` (appended to the default run folder name when active).
    """

    name: str
    kind: str
    title: str = ""
    summary: str = ""
    row: str | None = None
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    table_skip: frozenset[str] = frozenset()
    flags: tuple[Flag, ...] = ()
    presets: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[Any], list[str]] | None = None
    not_on: Mapping[str, str] = field(default_factory=dict)
    loss: Callable[[LossInputs], Any] | None = None
    combines_with_schemes: bool = False
    rate: Callable[[Any, int], float] | None = None
    corrects_labels: bool = False
    single_process: str = ""
    eager_forward: str = ""
    model_options: Callable[[Any], dict] | None = None
    init_state: Callable[[Any, LabelState], None] | None = None
    save_state: Callable[[LabelState], dict] | None = None
    load_state: Callable[[LabelState, dict], None] | None = None
    parameters: Callable[[LabelState], list] | None = None
    after_epoch: Callable[[Any, LabelState, int, Callable[[], torch.Tensor]], dict] | None = None
    scores_train_set: bool = False
    before_training: Callable[[Any, Callable[[torch.Tensor], float]], None] | None = None
    active: Callable[[Any], bool] | None = None
    cli: tuple[str, ...] = ()
    applies_to: tuple[str, ...] = ()
    presets_with: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    paper_with: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    name_suffix: Callable[[Mapping], str] | None = None

    @property
    def row_key(self) -> str | None:
        """The report's row key of this entry alone (modifiers: the suffix of their combined rows)."""
        if self.row is not None:
            return self.row
        return self.name if self.kind in (LOSS, SCHEME) and not self.combines_with_schemes else None

    @property
    def selected_by(self) -> tuple[str, ...]:
        """The command-line flags that select it."""
        return self.cli if self.kind == MODIFIER else (f"--{SELECTOR[self.kind]}", self.name)


REGISTRY: dict[str, Method] = {}
_version = 0


def _registration_problems(m: Method) -> list[str]:
    p = []
    if m.kind not in KINDS:
        p.append(f"kind must be one of {', '.join(KINDS)} (got {m.kind!r})")
    if not isinstance(m.name, str) or not _NAME.fullmatch(m.name):
        p.append("the name must be letters, digits, '-', '_' or '.' (it is a flag value and part of run names)")
    elif m.name in REGISTRY:
        p.append("that name is already registered (unregister it first)")
    if m.kind in (LOSS, SCHEME) and m.loss is None:
        p.append(f"a {m.kind} needs its batch loss (loss=...)")
    if m.loss is not None and m.kind not in (LOSS, SCHEME):
        p.append(f"a {m.kind} has no batch loss of its own (only losses and schemes do)")
    if m.kind == MODIFIER and (m.active is None or not m.cli or not m.row):
        p.append("a modifier needs active=..., cli=... (the flags that switch it on) and row=... (its row suffix)")
    if m.kind != MODIFIER and (m.active is not None or m.applies_to or m.presets_with or m.paper_with):
        p.append("active, applies_to, presets_with and paper_with belong to modifiers")
    if (m.save_state is None) != (m.load_state is None):
        p.append("save_state and load_state go together (a checkpoint must restore what it saves)")
    if m.parameters is not None and m.save_state is None:
        p.append("state trained by the optimiser (parameters=...) must be checkpointed: give save_state/load_state")
    if m.scores_train_set and m.after_epoch is None:
        p.append("scores_train_set is for an after_epoch hook, and there is none")
    per_dataset = [f for p in (m.presets, *m.presets_with.values()) for f, v in p.items() if isinstance(v, Mapping)]
    if per_dataset:
        p.append(f"per-dataset values of {', '.join('--' + f for f in per_dataset)} belong in the dataset entries: "
                 "presets={flag: from_dataset(key)} here, method_constants={key: {flag: value}} in each "
                 "datasets.DATASET_INFO entry (docs/extending.md)")  # fmt: skip
    if m.row_key is not None and "+" in m.row_key:
        p.append("a row key cannot contain '+' (it joins a row and a modifier)")
    for flag in m.flags:
        if not _NAME.fullmatch(flag.name) or "-" in flag.name or "." in flag.name:
            p.append(f"flag name {flag.name!r} must be a Python identifier (it is a Config field)")
        owner = next((e for e in REGISTRY.values() for f in e.flags if f.name == flag.name and f is not flag), None)
        if owner is not None:
            p.append(f"flag --{flag.name} is already defined by {owner.name!r}: share that Flag object")
    return p


def register(method: Method) -> Method:
    """Add an entry (``MethodError`` if it is incomplete or its name is taken). ``config.py`` picks it up at its next
    parse: its flags, presets and checks, and its selector value among the choices."""
    global _version
    problems = _registration_problems(method)
    if problems:
        raise MethodError(f"cannot register method {method.name!r}: {'; '.join(problems)}")
    REGISTRY[method.name] = method
    _version += 1
    return method


def unregister(name: str) -> Method:
    """Remove an entry (for tests and plugins); returns it."""
    global _version
    if name not in REGISTRY:
        raise MethodError(f"no method {name!r} is registered")
    _version += 1
    return REGISTRY.pop(name)


def registry_version() -> int:
    """Changes whenever an entry is added or removed (``config.py`` rebuilds ``Config`` then)."""
    return _version


def entries(kind: str | None = None) -> list[Method]:
    """The registered entries (of one kind), in registration order."""
    return [m for m in REGISTRY.values() if kind is None or m.kind == kind]


def names(kind: str) -> tuple[str, ...]:
    return tuple(m.name for m in entries(kind))


def get(name: str, kind: str) -> Method:
    """The entry ``name`` of ``kind``; ``MethodError`` naming the registered ones if there is none."""
    method = REGISTRY.get(name)
    if method is None or method.kind != kind:
        flag = f"--{SELECTOR[kind]} " if kind in SELECTOR else ""
        raise MethodError(f"unknown {kind} {flag}{name!r}: registered are {', '.join(names(kind)) or 'none'}")
    return method


def flags() -> dict[str, Flag]:
    """Every flag the entries own, by name, in registration order."""
    out: dict[str, Flag] = {}
    for method in REGISTRY.values():
        for flag in method.flags:
            out.setdefault(flag.name, flag)
    return out


def preset_flags() -> list[str]:
    """The flags some entry has presets for, in the order of ``flags()``: resolved when not given."""
    named = {n for m in REGISTRY.values() for n in m.presets}
    named |= {n for m in REGISTRY.values() for per_scheme in m.presets_with.values() for n in per_scheme}
    return [n for n in flags() if n in named]


def value_of(cfg, key: str, default=None):
    """A setting from a ``Config`` or from a mapping (a parsed command line, a ``config.json``)."""
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def active(cfg) -> list[Method]:
    """The entries a config uses, in the order their hooks run: variant, loss, scheme, modifiers, mode."""
    out = [get(value_of(cfg, SELECTOR[kind]), kind) for kind in (VARIANT, LOSS, SCHEME)]
    out += [m for m in entries(MODIFIER) if m.active(cfg)]
    out.append(get(value_of(cfg, SELECTOR[MODE]), MODE))
    return out


def for_dataset(preset, dataset: str, flag: str, missing=None):
    """A preset's value of ``flag`` for ``dataset``: the value itself when it is the same for every dataset; for a
    ``from_dataset`` preset, the dataset entry's, else the preset's general default, else ``missing``."""
    if not isinstance(preset, FromDataset):
        return preset
    info = datasets.DATASET_INFO.get(dataset)
    constants = info.method_constants.get(preset.key, {}) if info is not None else {}
    if flag in constants:
        return constants[flag]
    return preset.default if preset.has_default else missing


def constants_read() -> set[tuple[str, str]]:
    """The (key, flag) pairs of the dataset entries' ``method_constants`` that some entry reads."""
    out = set()
    for m in REGISTRY.values():
        for presets in (m.presets, *m.presets_with.values()):
            out |= {(p.key, flag) for flag, p in presets.items() if isinstance(p, FromDataset)}
    return out


def default_scheme(values) -> str:
    """``--mod_scheme`` when it is not given: the paper's LL-R for AN's loss on the observed labels; otherwise the
    plain scheme (the other losses take none, the full labels have nothing to modify)."""
    loss = get(value_of(values, SELECTOR[LOSS]), LOSS)
    observed = value_of(values, SELECTOR[VARIANT]) == OBSERVED
    return DEFAULT_SCHEME if observed and loss.combines_with_schemes else PLAIN_SCHEME


def model_options(cfg) -> dict:
    """The keyword arguments of ``models.build_model`` that the active entries set (BoostLU's ``boostlu_alpha``)."""
    out: dict = {}
    for method in active(cfg):
        if method.model_options is not None:
            out.update(method.model_options(cfg))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Rows of the table (report.py, scripts/reproduce_table.sh, --list_methods).


def rows() -> list[tuple[str, str, tuple[str, ...]]]:
    """Every row of the table: (row key, title, the flags that select it), variants, losses and schemes in
    registration order, then each modifier with each scheme it applies to."""
    out = []
    for m in REGISTRY.values():
        if m.kind in (VARIANT, LOSS, SCHEME) and m.row_key is not None:
            out.append((m.row_key, m.title or m.name, m.selected_by))
    for mod in entries(MODIFIER):
        for scheme in mod.applies_to:
            base = REGISTRY.get(scheme)
            title = base.title if base is not None else scheme
            out.append((f"{scheme}+{mod.row}", f"{title} + {mod.title}", (f"--{SELECTOR[SCHEME]}", scheme, *mod.cli)))
    return out


def row_of(values) -> str:
    """The table row of a run (a config or a ``config.json``): e.g. ``LL-R``, ``wan``, ``full``, ``LL-Ct+BoostLU``.
    A method that is not registered (a run of a removed method) is its own name."""
    variant = REGISTRY.get(value_of(values, "train_set_variant", "observed"))
    loss = REGISTRY.get(value_of(values, "loss", "an"))
    if variant is not None and variant.kind == VARIANT and variant.row_key:
        base = variant.row_key
    elif loss is None or loss.kind != LOSS:
        base = str(value_of(values, "loss"))
    elif loss.combines_with_schemes:
        scheme = REGISTRY.get(value_of(values, "mod_scheme"))
        base = scheme.row_key if scheme is not None and scheme.row_key else str(value_of(values, "mod_scheme"))
    else:
        base = loss.row_key
    for mod in entries(MODIFIER):
        if mod.active(values):
            base += f"+{mod.row}"
    return base


def _row_entry(key: str) -> Method | None:
    return next((m for m in REGISTRY.values() if m.kind != MODIFIER and m.row_key == key), None)


def row_title(key: str) -> str:
    """A row's title, e.g. "Naive AN", "LL-R + BoostLU" (an unknown row: its key)."""
    base, *mods = key.split("+")
    entry = _row_entry(base)
    title = entry.title if entry is not None and entry.title else base
    for suffix in mods:
        mod = next((m for m in entries(MODIFIER) if m.row == suffix), None)
        title += f" + {mod.title if mod is not None else suffix}"
    return title


def row_skipped_on(key: str, dataset: str) -> bool:
    """Whether ``scripts/reproduce_table.sh``'s default table leaves the row out on ``dataset`` (its ``table_skip``)."""
    base, *suffixes = key.split("+")
    parts = [_row_entry(base), *(next((m for m in entries(MODIFIER) if m.row == s), None) for s in suffixes)]
    return any(m is not None and dataset in m.table_skip for m in parts)


def row_order(key: str) -> tuple:
    """Sort key of rows: the order of ``rows()``, unknown rows after them by name."""
    order = [k for k, _, _ in rows()]
    return (order.index(key) if key in order else len(order), key)


def paper_number(key: str, train_mode: str, dataset: str) -> float | None:
    """The published test mAP of a row, by train mode and dataset name (None when there is none)."""
    base, _, suffix = key.partition("+")
    if suffix:
        mod = next((m for m in entries(MODIFIER) if m.row == suffix), None)
        table = mod.paper_with.get(base, {}) if mod is not None else {}
    else:
        entry = _row_entry(base)
        table = entry.paper if entry is not None else {}
    return table.get(train_mode, {}).get(dataset)


# ---------------------------------------------------------------------------------------------------------------------
# For the trainer: everything method-specific that train.py calls, through the registry.


def compute_loss(
    cfg,
    logits: torch.Tensor,
    batch_observed: torch.Tensor,
    idx: torch.Tensor,
    rate: float,
    state: LabelState,
    *,
    select: losses.Select | None = None,
    reduce: losses.Reduce | None = None,
    epoch: int | None = None,
    flip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured method's batch loss and the entries LL selected (none for the other losses), dispatched
    through the registry: ``--loss``'s entry (for AN's loss, ``--mod_scheme``'s). An unknown or incomplete entry is a
    ``MethodError``. ``select`` and ``reduce``: see ``losses.large_loss``; ``epoch``: for losses with a schedule;
    ``flip``: the batch's horizontal flips (bool, on the device), for losses whose targets depend on the view."""
    method = get(cfg.loss, LOSS)
    out = method.loss(LossInputs(cfg, logits, batch_observed, idx, state, rate, epoch, select, reduce, flip))
    if isinstance(out, tuple):
        return out
    return out, torch.zeros_like(batch_observed, dtype=torch.bool)


def modification_rate(cfg, epoch: int) -> float:
    """The scheme's fraction of a batch's entries to reject or correct at ``epoch`` (1-indexed)."""
    scheme = get(cfg.mod_scheme, SCHEME)
    return scheme.rate(cfg, epoch) if scheme.rate is not None else 0.0


def corrects_labels(cfg) -> bool:
    """Whether the scheme's selections are permanent corrections of the label store (LL-Cp)."""
    return get(cfg.mod_scheme, SCHEME).corrects_labels


def _first_active_with(cfg, reason_field: str) -> tuple[str, str] | None:
    """(the flags that select it, its reason) of the first active entry whose ``reason_field`` is set, or None."""
    method = next((m for m in active(cfg) if getattr(m, reason_field)), None)
    return None if method is None else (" ".join(method.selected_by), getattr(method, reason_field))


def single_process_reason(cfg) -> str | None:
    """Why the config cannot run under torchrun (None: it can)."""
    found = _first_active_with(cfg, "single_process")
    return None if found is None else f"{found[0]} runs in a single process: {found[1]}. Start it without torchrun."


def eager_forward_reason(cfg) -> str | None:
    """Why the config's training forward cannot be replayed as a CUDA graph (None: it can)."""
    found = _first_active_with(cfg, "eager_forward")
    return None if found is None else f"{found[0]} needs the model's forward run eagerly: {found[1]}"


def build_label_state(cfg, split: datasets.Split, device: torch.device) -> LabelState:
    """The label store of the training split, plus the active methods' per-image state (their ``init_state``)."""
    observed = label_store(split.observed, device)
    used = active(cfg)
    state = LabelState(observed, hooks=tuple(m for m in used if m.save_state is not None), train_split=split)
    if not isinstance(split.observed, label_rules.SparseLabels):
        state.initial = observed.matrix.clone()
        state.clean = torch.from_numpy(split.labels > 0).to(device)
    for method in used:
        if method.init_state is not None:
            method.init_state(cfg, state)
    return state


def extra_param_groups(cfg, state: LabelState) -> list[dict]:
    """Optimiser groups for the methods' trained state (ROLE's estimator), at the head's learning rate."""
    return [
        {"params": list(method.parameters(state)), "lr": cfg.lr * cfg.lr_mult}
        for method in active(cfg)
        if method.parameters is not None
    ]


def best_model_extras(cfg, state: LabelState) -> dict:
    """What ``bestmodel.pt`` keeps beside the model: the trained state of the methods (ROLE's ``estimator``)."""
    out: dict = {}
    for method in active(cfg):
        if method.parameters is not None:
            out.update(method.save_state(state))
    return out


def needs_train_scores(cfg) -> bool:
    """Whether an ``after_epoch`` hook scores the training images (the trainer then builds a row-order loader)."""
    return any(method.scores_train_set for method in active(cfg))


def after_epoch(cfg, state: LabelState, epoch: int, train_scores: Callable[[], torch.Tensor]) -> dict:
    """Run the active methods' per-epoch hooks after end-to-end epoch ``epoch`` (EM+APL's pseudo-labelling);
    ``train_scores()`` scores the training images in row order (called only by a hook that needs it). Returns what
    to add to the epoch's log line."""
    stats: dict = {}
    for method in active(cfg):
        if method.after_epoch is not None:
            stats.update(method.after_epoch(cfg, state, epoch, train_scores))
    return stats


def before_training_hooks(cfg) -> list[Method]:
    """The active entries with a phase before end-to-end training (LinearInit)."""
    return [method for method in active(cfg) if method.before_training is not None]


def before_training(session, val_map: Callable[[torch.Tensor], float]) -> None:
    """Run those phases (on a fresh start, not on resume). ``session`` is the trainer's (cfg, ctx, device, data,
    model, state, log, stop); ``val_map(scores)`` is the val mAP of scores of every val image in row order."""
    for method in before_training_hooks(session.cfg):
        method.before_training(session, val_map)


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics (the paper's memorisation analysis), from the training forward passes.


class Diagnostics:
    """Per epoch, on the device: AN loss and predicted probability on false-negative entries (unobserved, truly
    positive) versus true-negative entries (unobserved, truly negative), and the number and precision (fraction truly
    positive) of the entries LL selected. "Unobserved" refers to the labels before any correction."""

    _FIELDS = ("fn_count", "fn_loss", "fn_prob", "tn_count", "tn_loss", "tn_prob", "selected", "selected_true")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)

    def update(
        self,
        logits: torch.Tensor,
        initial: torch.Tensor,
        clean: torch.Tensor,
        selected: torch.Tensor,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. ``real``: which rows count (padding rows under torchrun do not). Masks are applied by
        arithmetic (``torch.where``), never by boolean indexing, so nothing here waits for the GPU."""
        logits = logits.detach().float()
        prob, an_loss = torch.sigmoid(logits).double(), F.softplus(logits).double()  # softplus(z) = BCE(z, 0)
        unobserved = initial == 0
        if real is not None:
            unobserved = unobserved & real[:, None]
            selected = selected & real[:, None]
        false_neg, true_neg = unobserved & clean, unobserved & ~clean
        zero = torch.zeros((), dtype=torch.float64, device=logits.device)
        self.sums += torch.stack(
            [
                false_neg.sum().double(),
                torch.where(false_neg, an_loss, zero).sum(),
                torch.where(false_neg, prob, zero).sum(),
                true_neg.sum().double(),
                torch.where(true_neg, an_loss, zero).sum(),
                torch.where(true_neg, prob, zero).sum(),
                selected.sum().double(),
                (selected & clean).sum().double(),
            ]  # fmt: skip
        )

    def summary(self) -> dict:
        s = dict(zip(self._FIELDS, self.sums.tolist(), strict=True))

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "fn_loss": ratio(s["fn_loss"], s["fn_count"]),
            "tn_loss": ratio(s["tn_loss"], s["tn_count"]),
            "fn_prob": ratio(s["fn_prob"], s["fn_count"]),
            "tn_prob": ratio(s["tn_prob"], s["tn_count"]),
            "selected_precision": ratio(s["selected_true"], s["selected"]),
        }


def corrected_labels_summary(state: LabelState) -> dict:
    """LL-Cp: how many labels have been corrected to positive so far, and the fraction that is truly positive."""
    corrected = (state.observed.matrix == 1) & (state.initial == 0)
    count = int(corrected.sum())
    return {
        "corrected_total": count,
        "corrected_precision": int((corrected & state.clean).sum()) / count if count else None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# EM+APL: asymmetric pseudo-labelling after each epoch from the warm-up on.


def pseudo_label_negatives(scores: torch.Tensor, state: LabelState) -> int:
    """From the scores of every training image (row order, no augmentation), turn each class's lowest-scored
    still-unlabelled unobserved entries into soft negatives (soft label = the score). Returns how many were labelled."""
    extra = state.extra
    chosen = losses.asymmetric_pseudo_negatives(
        scores, state.observed.matrix, extra["pseudo_negative"], extra["apl_quota"]
    )
    extra["pseudo_negative"] |= chosen
    extra["soft_label"] = torch.where(chosen, scores.float(), extra["soft_label"])
    return int(chosen.sum())


# ---------------------------------------------------------------------------------------------------------------------
# LinearInit: train the head on frozen, cached backbone features, then fine-tune end to end.


def feature_cache_path(cfg, split: datasets.Split) -> Path:
    """One file per (backbone weights, image size, image list): computed once, reused by every run that shares them.
    Kept with the files derived from the dataset (``datasets.derived_dir``: the data root, or ``--cache_dir``)."""
    if not cfg.use_pretrained:
        weights = f"scratch-seed{cfg.seed}"
    elif getattr(cfg, "pretrained_path", None) is not None:  # a local file: named by its path, size and time
        stat = Path(cfg.pretrained_path).stat()
        key = f"{Path(cfg.pretrained_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        weights = "file-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    else:  # a timm name carries its pretrained tag; a ResNet its torchvision weights
        weights = "pretrained" if cfg.arch == "smallcnn" or models.is_timm(cfg.arch) else cfg.pretrained_weights
    arch = cfg.arch.replace(":", "-").replace("/", "-")
    name = f"{arch}_{weights}_{cfg.image_size}px_{loaders.split_fingerprint(split)}.npy"
    return datasets.derived_dir(cfg) / "features" / name


@torch.inference_mode()
def cached_features(
    cfg, model: models.MultiLabelClassifier, split: datasets.Split, device: torch.device
) -> torch.Tensor:
    """Pooled backbone features of every image of ``split`` (no augmentation, BatchNorm in eval mode), on ``device``."""
    path = feature_cache_path(cfg, split)
    if path.exists():
        cached, problem = _readable_features(path, (len(split), model.head.in_features))
        if problem is None:
            print(f"LinearInit: cached features {path}")
            return torch.from_numpy(cached).to(device)
        print(f"LinearInit: the cached features {path} {problem}: computing them again")  # a cache: nothing is lost
    model.eval()
    loader = loaders.make_loader(split, cfg, train=False, pin_memory=device.type == "cuda", eval_resize=cfg.eval_resize)

    def features(images) -> torch.Tensor:
        x = loaders.to_model_input(loaders.batch_to_device(images, device))
        return model.pool_features(model.backbone(x)).float().cpu()

    feats = [features(images) for images, _ in tqdm(loader, desc=f"features {path.name}", leave=False, file=sys.stderr)]
    array = torch.cat(feats).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_npy_atomic(path, array)
    print(f"LinearInit: features computed once and cached in {path}")
    return torch.from_numpy(array).to(device)


def _readable_features(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """The cached features, or why they cannot be used (cut short, another shape, non-finite values)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        return None, f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if array.shape != shape or array.dtype != np.float32:
        return None, f"hold {array.dtype} {array.shape}, not float32 {shape}"
    if not np.isfinite(array).all():
        return None, "hold non-finite values"
    return array, None


def make_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """The official optimiser over parameter groups that carry their own lr: Adam without weight decay, or SGD with
    momentum 0.9 and weight decay 1e-3. Adam on CUDA is torch's fused implementation (``fused_adam``)."""
    groups = [{**group, "params": list(group["params"])} for group in groups]  # a generator is read once, here
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=True if fused_adam(groups) else None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=1e-3)


def fused_adam(groups: list[dict]) -> bool:
    """Whether Adam runs fused: when every parameter is on CUDA. The same update as the default implementation, in
    one kernel for all parameters instead of several passes over them: 1.03x the training rate of the paper's COCO
    setting on an H100, rounded differently (docs/performance.md). A CPU run keeps the default, so CPU results repeat
    as before; a resumed run keeps the implementation its checkpoint was saved with (the optimiser's state holds it)."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def train_linear_head(
    cfg, model, state: LabelState, train_feats, val_feats, val_labels, evaluate_scores, log, after_epoch=None
) -> dict:
    """Phase 1 of LinearInit: ``cfg.linear_epochs`` epochs of the head alone (and the methods' trained state, ROLE's
    estimator) on cached features, with the configured loss and no LL modification. The best-val head (and state) is
    loaded for phase 2. ``evaluate_scores(scores, val_labels)`` gives the val mAP; ``after_epoch()`` runs after each
    epoch (the trainer stops there on a SIGINT)."""
    learnt = [m for m in active(cfg) if m.parameters is not None]
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr * cfg.lr_mult}, *extra_param_groups(cfg, state)]
    optimizer = make_optimizer(cfg, groups)
    batches = loaders.EpochBatches(len(train_feats), cfg.bsize, shuffle=True, seed=cfg.seed + 1)
    best = {"val_map": -1.0, "epoch": 0}
    best_states: tuple = ()
    for epoch in range(1, cfg.linear_epochs + 1):
        batches.set_epoch(epoch)
        total = 0.0
        for batch in batches:
            idx = torch.tensor(batch, device=train_feats.device)
            loss, _ = compute_loss(cfg, model.head(train_feats[idx]), state.observed.batch(idx), idx, 0.0, state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        with torch.no_grad():
            val_map = evaluate_scores(torch.sigmoid(model.head(val_feats)), val_labels)
        log({"phase": "linear", "epoch": epoch, "train_loss": total / len(batches), "val_map": val_map})
        if val_map > best["val_map"]:
            best = {"val_map": val_map, "epoch": epoch}
            best_states = (
                copy.deepcopy(model.head.state_dict()),
                [copy.deepcopy(m.save_state(state)) for m in learnt],
            )
        if after_epoch is not None:
            after_epoch()
    model.head.load_state_dict(best_states[0])
    for method, saved in zip(learnt, best_states[1], strict=True):
        method.load_state(state, saved)
    return best


def linear_init_phase(session, val_map: Callable[[torch.Tensor], float]) -> None:
    """LinearInit's phase before end-to-end training (its ``before_training`` hook): the best linear head is left in
    the model. The first process computes the features; every process then trains the same head on all of them (same
    seed, same result)."""
    s = session
    cfg, model, data, device = s.cfg, s.model, s.data, s.device
    if s.ctx.is_main:
        cached_features(cfg, model, data.train, device)
        cached_features(cfg, model, data.val, device)
    distributed.barrier(s.ctx)
    train_feats = cached_features(cfg, model, data.train, device)
    val_feats = cached_features(cfg, model, data.val, device)
    best = train_linear_head(
        cfg, model, s.state, train_feats, val_feats, None, lambda scores, _: val_map(scores), s.log, s.stop.check
    )
    if s.ctx.is_main:
        print(f"LinearInit: best head from linear epoch {best['epoch']} (val mAP {best['val_map']:.2f}); fine-tuning")


# ---------------------------------------------------------------------------------------------------------------------
# The entries. Sources of the constants and numbers (docs/methods.md gives them in full):
# - the paper: Kim, Kim, Akata, Lee, "Large Loss Matters in Weakly Supervised Multi-Label Classification", CVPR 2022
#   (its result tables: end-to-end, LinearInit, OpenImages V3 "All"); delta_rel, optimiser and lr per dataset: the
#   best settings the authors posted in the official repository (snucml/LargeLossMatters, issue #4).
# - Cole et al., CVPR 2021 (elijahcole/single-positive-multi-label): WAN, LSAN, EPR, ROLE, their constants.
# - Zhou et al., ECCV 2022 (Correr-Zhou/SPML-AckTheUnknown): EM and EM+APL, their released per-dataset defaults.
# - BoostLU: Kim et al., CVPR 2023 (youngwk/BridgeGapExplanationPAMC): its delta_rel, and its table (which also
#   reports EM+APL).
# The per-dataset constants are in the dataset entries (datasets.DATASET_INFO's method_constants), read here with
# from_dataset; a value that is the same on every dataset stays in the method's entry.


def _in_range(name: str, low: float, high: float, *, low_open=False, high_open=False) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return None
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f"--{name} must lie in {interval} (got {value})"

    return check


def _at_least(name: str, low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"--{name} must be >= {low:g} (got {value})"


def _needs_expected_num_pos(cfg) -> list[str]:
    info = datasets.DATASET_INFO.get(cfg.dataset)
    if info is not None and cfg.expected_num_pos > info.num_classes:
        return [f"--expected_num_pos is the expected number of positive labels per image: at most the "
                f"{info.num_classes} classes of {info.title} (got {cfg.expected_num_pos:g})"]  # fmt: skip
    if cfg.expected_num_pos > 0:
        return []
    return [f"--loss {cfg.loss} needs --expected_num_pos > 0 (got {cfg.expected_num_pos})"]


def _dense_state(method: str, state: LabelState) -> torch.Tensor:
    if state.initial is None:
        raise MethodError(f"{method} keeps per-image state over the dense observed-label matrix, which sparse datasets "
                          "do not have; add them to its not_on")  # fmt: skip
    return state.initial


# The variants: single positive (observed) labels, or the full labels (the upper bound).


def _clean_rules(cfg) -> list[str]:
    problems = []
    if (cfg.num_pos, cfg.num_neg, cfg.label_proportion) != (1, 0, None):
        problems.append("--num_pos, --num_neg and --label_proportion choose the observed labels; with "
                        "--train_set_variant clean every label is known: drop them")  # fmt: skip
    if cfg.mod_scheme != "AN" or cfg.loss != "an":
        problems.append(
            "--train_set_variant clean trains on full labels with plain BCE: no entry is unobserved, so there is "
            "nothing to reject, correct or regularise; use --mod_scheme AN --loss an (the defaults with clean)"
        )
    info = datasets.DATASET_INFO.get(cfg.dataset)
    if info is not None and info.sparse:
        problems.append(f"{info.title} has partial labels only, no full labels: --train_set_variant clean is not "
                        "available for it")  # fmt: skip
    return problems


register(Method(OBSERVED, VARIANT, summary="the observed (partial) labels: single positive by default"))
register(
    Method(
        "clean", VARIANT, title="Full label", row="full", summary="plain BCE on the full labels (the upper bound)",
        validate=_clean_rules,
        paper={"end_to_end": {"pascal": 90.2, "coco": 78.0, "nuswide": 54.5, "cub": 32.9},
               "linear_init": {"pascal": 91.1, "coco": 77.2, "nuswide": 54.9, "cub": 34.0}},
    )
)  # fmt: skip


# The LL schemes modify the AN loss (losses.large_loss); AN itself modifies nothing.


def _scheme_loss(b: LossInputs):
    return losses.large_loss(b.logits, b.observed, b.cfg.mod_scheme, b.rate, select=b.select, reduce=b.reduce)


def _scheme_rate(cfg, epoch: int) -> float:
    return losses.modification_rate(cfg.mod_scheme, epoch, cfg.delta_rel)


DELTA_REL = Flag(
    "delta_rel", float, 0.0, "percent per epoch (default: preset)", check=_in_range("delta_rel", 0, 100),
    always_preset=True,
)  # fmt: skip

register(
    Method(
        "AN", SCHEME, title="Naive AN", summary="assume negative: unobserved labels are negatives, nothing modified",
        loss=_scheme_loss, rate=_scheme_rate, flags=(DELTA_REL,), presets={"delta_rel": 0.0},
        paper={"end_to_end": {"pascal": 85.1, "coco": 64.1, "nuswide": 42.0, "cub": 19.1, "openimages": 82.0},
               "linear_init": {"pascal": 86.9, "coco": 68.7, "nuswide": 47.6, "cub": 20.9}},
    )
)  # fmt: skip


# The baseline losses (losses.py), each on the same protocol.


def _an_loss(b: LossInputs):
    """AN's loss, as modified by the configured scheme."""
    return get(b.cfg.mod_scheme, SCHEME).loss(b)


register(
    Method(
        "an", LOSS, summary="the AN loss, modified by --mod_scheme (AN, LL-R, LL-Ct, LL-Cp)", loss=_an_loss,
        combines_with_schemes=True,
    )
)  # fmt: skip
register(
    Method(
        "wan", LOSS, title="WAN", summary="weak AN: unobserved negatives weighted 1 / (C - 1)",
        loss=lambda b: losses.wan_loss(b.logits, b.observed, reduce=b.reduce),
        paper={"end_to_end": {"pascal": 86.5, "coco": 64.8, "nuswide": 46.3, "cub": 20.3, "openimages": 77.0},
               "linear_init": {"pascal": 87.1, "coco": 68.0, "nuswide": 47.5, "cub": 21.1}},
    )
)  # fmt: skip
register(
    Method(
        "lsan", LOSS, title="LSAN", summary="AN with label smoothing",
        flags=(Flag("ls_coef", float, 0.1, "LSAN label smoothing",
                    check=_in_range("ls_coef", 0, 0.5, high_open=True)),),
        loss=lambda b: losses.lsan_loss(b.logits, b.observed, b.cfg.ls_coef, reduce=b.reduce),
        paper={"end_to_end": {"pascal": 86.7, "coco": 66.9, "nuswide": 44.9, "cub": 17.9, "openimages": 75.0},
               "linear_init": {"pascal": 86.5, "coco": 69.2, "nuswide": 50.5, "cub": 16.6}},
    )
)  # fmt: skip

# Cole et al.'s expected number of positives per image (their paper; the synthetic data's true mean), in the dataset
# entries under "epr"; ROLE reads the same. OpenImages has none: EPR and ROLE are not offered there, and its runs
# record the flag's default 0.
EXPECTED_NUM_POS = Flag("expected_num_pos", float, 0.0, "EPR/ROLE (default: preset)", always_preset=True)
_EXPECTED_NUM_POS = from_dataset("epr")
_NO_EXPECTED_COUNT = {"openimages": "no expected number of positives is published for it"}

register(
    Method(
        "epr", LOSS, title="EPR", summary="observed labels plus the expected-positive regulariser",
        flags=(EXPECTED_NUM_POS,), presets={"expected_num_pos": _EXPECTED_NUM_POS}, validate=_needs_expected_num_pos,
        not_on=_NO_EXPECTED_COUNT, single_process="its regulariser needs the whole batch in one place",
        loss=lambda b: losses.epr_loss(b.logits, b.observed, b.cfg.expected_num_pos, reduce=b.reduce),
        paper={"end_to_end": {"pascal": 85.5, "coco": 63.3, "nuswide": 46.0, "cub": 20.0},
               "linear_init": {"pascal": 84.9, "coco": 66.8, "nuswide": 48.1, "cub": 21.2}},
    )
)  # fmt: skip


def _role_init(cfg, state: LabelState) -> None:
    generator = torch.Generator().manual_seed(cfg.seed)
    initial = _dense_state("ROLE", state)
    state.extra["estimator"] = models.LabelEstimator(initial, generator).to(state.observed.device)


def _role_loss(b: LossInputs):
    estimated = b.state.extra["estimator"](b.rows)
    return losses.role_loss(b.logits, b.observed, estimated, b.cfg.expected_num_pos, reduce=b.reduce)


def _role_load(state: LabelState, saved: dict) -> None:
    state.extra["estimator"].load_state_dict(saved["estimator"])


register(
    Method(
        "role", LOSS, title="ROLE", summary="a per-image label estimator trained jointly, with EPR's regulariser",
        flags=(EXPECTED_NUM_POS,), presets={"expected_num_pos": _EXPECTED_NUM_POS}, validate=_needs_expected_num_pos,
        not_on=_NO_EXPECTED_COUNT,
        single_process="its regulariser needs the whole batch in one place, and its estimator has a row per image",
        loss=_role_loss, init_state=_role_init, save_state=lambda s: {"estimator": s.extra["estimator"].state_dict()},
        load_state=_role_load, parameters=lambda s: list(s.extra["estimator"].parameters()),
        paper={"end_to_end": {"pascal": 87.9, "coco": 66.3, "nuswide": 43.1, "cub": 15.0},
               "linear_init": {"pascal": 88.2, "coco": 69.0, "nuswide": 51.0, "cub": 16.8}},
    )
)  # fmt: skip

# Zhou et al.'s released per-dataset defaults, in the dataset entries: em_alpha under "em" (EM+APL reads the same),
# apl_beta and apl_warmup under "em_apl".
EM_ALPHA = Flag("em_alpha", float, 0.1, "EM entropy weight (default: preset)", check=_at_least("em_alpha", 0),
                always_preset=True)  # fmt: skip
_EM_ALPHA = from_dataset("em")

register(
    Method(
        "em", LOSS, title="EM", summary="entropy maximisation on unobserved labels", flags=(EM_ALPHA,),
        presets={"em_alpha": _EM_ALPHA}, table_skip=frozenset({"openimages"}),
        loss=lambda b: losses.em_loss(b.logits, b.observed, b.cfg.em_alpha, reduce=b.reduce),
    )
)  # fmt: skip


def _apl_rules(cfg) -> list[str]:
    if 1 <= cfg.apl_warmup < cfg.num_epochs:
        return []
    return [f"--apl_warmup must lie in [1, num_epochs) (got {cfg.apl_warmup} with {cfg.num_epochs} epochs)"]


def _apl_init(cfg, state: LabelState) -> None:
    initial = _dense_state("EM+APL", state)
    state.extra["pseudo_negative"] = torch.zeros_like(initial, dtype=torch.bool)
    state.extra["soft_label"] = torch.zeros_like(initial, dtype=torch.float32)
    # Zhou et al.: each labelling round takes neg_proportion * (unobserved entries of the class) / (rounds).
    unobserved = (initial == 0).sum(0).double()
    rounds = cfg.num_epochs - cfg.apl_warmup
    state.extra["apl_quota"] = (cfg.apl_neg_proportion * unobserved / rounds).floor().long()


def _apl_loss(b: LossInputs):
    pseudo, soft = b.state.extra["pseudo_negative"][b.rows], b.state.extra["soft_label"][b.rows]
    return losses.em_loss(b.logits, b.observed, b.cfg.em_alpha, pseudo_negative=pseudo, soft_label=soft,
                          beta=b.cfg.apl_beta, reduce=b.reduce)  # fmt: skip


def _apl_save(state: LabelState) -> dict:
    return {"pseudo_negative": state.extra["pseudo_negative"].cpu(), "soft_label": state.extra["soft_label"].cpu()}


def _apl_load(state: LabelState, saved: dict) -> None:
    device = state.extra["pseudo_negative"].device
    state.extra["pseudo_negative"] = saved["pseudo_negative"].to(device)
    state.extra["soft_label"] = saved["soft_label"].to(device)


def _apl_after_epoch(cfg, state: LabelState, epoch: int, train_scores) -> dict:
    """APL labels after each epoch from the warm-up on; after the last one the labels would never be used."""
    if cfg.apl_warmup <= epoch < cfg.num_epochs:
        return {"pseudo_labelled": pseudo_label_negatives(train_scores(), state)}
    return {}


register(
    Method(
        "em_apl", LOSS, title="EM+APL", summary="EM plus asymmetric pseudo-labelling of negatives after each epoch",
        flags=(
            EM_ALPHA,
            Flag("apl_beta", float, 0.2, "APL pseudo-label weight (default: preset)", check=_at_least("apl_beta", 0),
                 always_preset=True),
            Flag("apl_warmup", int, 5, "APL's first labelling epoch (default: preset)", always_preset=True),
            Flag("apl_neg_proportion", float, 0.9, "APL: share of unobserved labelled",
                 check=_in_range("apl_neg_proportion", 0, 1, low_open=True)),
        ),
        presets={
            "em_alpha": _EM_ALPHA,
            "apl_beta": from_dataset("em_apl"),
            "apl_warmup": from_dataset("em_apl"),
        },
        validate=_apl_rules,
        not_on={"openimages": "its per-image pseudo-labels would take 3.4M x 5,000 entries"},
        loss=_apl_loss, init_state=_apl_init, save_state=_apl_save, load_state=_apl_load,
        after_epoch=_apl_after_epoch, scores_train_set=True,
        paper={"end_to_end": {"pascal": 89.19, "coco": 70.87, "nuswide": 47.59, "cub": 21.84}},  # BoostLU's table
    )
)  # fmt: skip


# GR Loss (Chen et al., IJCAI 2024): the authors' released defaults, a general default for every dataset (they publish
# no per-dataset values; docs/gr_loss.md). A dataset entry may hold its own under "gr".


def _gr_loss(b: LossInputs) -> torch.Tensor:
    c = b.cfg
    if b.epoch is None:  # LinearInit's frozen phase: the authors' --linear_init holds the schedule at its start there
        epoch, num_epochs, linear_init = 1, c.linear_epochs + c.num_epochs, c.linear_epochs
    else:  # the same schedule as the authors' after their --linear_init epochs: it spans the end-to-end epochs
        epoch, num_epochs, linear_init = b.epoch, c.num_epochs, 0
    return losses.gr_loss(b.logits, b.observed, epoch=epoch, num_epochs=num_epochs, w=c.gr_w, b=c.gr_b, mu=c.gr_mu,
                          sigma=c.gr_sigma, q2=c.gr_q2, q3=c.gr_q3, linear_init=linear_init,
                          reduce=b.reduce)  # fmt: skip


def _gr_rules(c) -> list[str]:
    return losses.gr_problems(w=c.gr_w, b=c.gr_b, mu=c.gr_mu, sigma=c.gr_sigma, q2=c.gr_q2, q3=c.gr_q3,
                              linear_init=0, num_epochs=c.num_epochs)  # fmt: skip


_GR_PAIRS, _GR_SCALARS = ("w", "b", "mu", "sigma"), ("q2", "q3")
_GR_SYNTHETIC = losses.GR_RELEASED
_GR_FLAGS = tuple(Flag(f"gr_{k}", float, tuple(_GR_SYNTHETIC[k]), f"GR {k}: start and end values (default: preset)",
                       nargs=2) for k in _GR_PAIRS) + tuple(
    Flag(f"gr_{k}", float, _GR_SYNTHETIC[k], f"GR {k} (default: preset)") for k in _GR_SCALARS)  # fmt: skip
register(
    Method(
        "gr", LOSS, title="GR Loss", summary="generalised robust loss, soft pseudo-labels (Chen et al., IJCAI 2024)",
        flags=_GR_FLAGS,
        presets={f"gr_{k}": from_dataset("gr", tuple(_GR_SYNTHETIC[k]) if k in _GR_PAIRS else _GR_SYNTHETIC[k])
                 for k in _GR_PAIRS + _GR_SCALARS},
        validate=_gr_rules,
        loss=_gr_loss,
        table_skip=frozenset({"openimages"}),  # not in the paper's OpenImages table
        paper={"end_to_end": {d: v for d, v in losses.GR_PAPER_MAP.items() if v is not None}},
    )
)  # fmt: skip


# Vision-language pseudo-labels: VLPL (Xing et al., CVPR Workshops 2024; mvrl/VLPL) and AEVLP (Tran et al., ICCV 2025;
# Fsoft-AIC/AEVLP). A frozen CLIP's scores are computed once per dataset and scorer (pseudo_labels.py); when a run
# starts, each method's rule turns them into pseudo-labels per training image and flip (the rules need nothing from the
# model being trained), kept on the device; the training step picks the row of the flip the loader drew. docs/vlp.md.

VLP_CLIP = Flag("vlp_clip", str, pseudo_labels.STANDIN, "CLIP scorer of the score file: an open_clip model name, or "
                "'standin' (synthetic) (default: preset)")  # fmt: skip
VLP_GRID = Flag("vlp_grid", int, 4, "crops per side of the score file; 0: whole image only (default: preset)",
                check=_in_range("vlp_grid", 0, 8))  # fmt: skip
VLP_TEMPERATURE = Flag("vlp_temperature", float, 0.01, "temperature of CLIP's softmax over classes (default: preset)",
                       check=lambda v: None if v > 0 else f"--vlp_temperature must be > 0 (got {v})")  # fmt: skip
VLP_THRESHOLD = Flag("vlp_threshold", float, 0.5, "score a positive pseudo-label must reach (default: preset)",
                     check=_in_range("vlp_threshold", 0, 1))  # fmt: skip
VLP_NEGATIVES = Flag("vlp_negatives", float, 0.0, "fraction of classes, lowest scores, made negative pseudo-labels "
                     "(default: preset)", check=_in_range("vlp_negatives", 0, 1))  # fmt: skip
_VLP_FLAGS = (VLP_CLIP, VLP_GRID, VLP_TEMPERATURE, VLP_THRESHOLD, VLP_NEGATIVES)
_NO_PSEUDO_LABELS = {"openimages": "its pseudo-labels would take 3.4M images x 5,000 classes, and no prompt set is "
                     "published for it"}  # fmt: skip


def _vlpl_rule(values, similarity: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """VLPL's pseudo-labels (whole image only) with the settings in ``values`` (a config or a preset mapping)."""
    return losses_vlp.vlpl_pseudo_labels(
        similarity[..., 0, :], temperature=value_of(values, "vlp_temperature"),
        threshold=value_of(values, "vlp_threshold"), negative_fraction=value_of(values, "vlp_negatives"),
    )  # fmt: skip


def _aevlp_rule(values, similarity: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """AEVLP's DAMP pseudo-labels (whole image and crops) with the settings in ``values``."""
    return losses_vlp.aevlp_pseudo_labels(
        similarity, observed, temperature=value_of(values, "vlp_temperature"),
        threshold=value_of(values, "vlp_threshold"), top_k=value_of(values, "aevlp_top_k"),
        eta=value_of(values, "aevlp_eta"), negative_ratio=value_of(values, "vlp_negatives"),
    )  # fmt: skip


_VLP_RULES = {"vlpl": _vlpl_rule, "aevlp": _aevlp_rule}


def pseudo_label_rules(dataset: str) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``{method: rule(similarity ... x V x C, observed ... x C) -> pseudo-labels}`` with each registered method's
    preset constants for ``dataset`` (the scoring pass reports their precision and recall)."""
    out = {}
    for name, rule in _VLP_RULES.items():
        entry = REGISTRY.get(name)
        if entry is not None and dataset not in entry.not_on:
            values = {k: for_dataset(v, dataset, k) for k, v in entry.presets.items()}
            out[name] = functools.partial(rule, values)
    return out


def vlp_score_file(cfg, names: np.ndarray) -> tuple[Path, str]:
    """The score file a run of ``cfg`` reads, and the one command that makes it."""
    derived = datasets.derived_dir(cfg)
    default_root = Path(__file__).resolve().parent / "data" / cfg.dataset
    same_root = Path(cfg.data_root).resolve() == default_root.resolve()
    fix = pseudo_labels.make_command(cfg.dataset, cfg.vlp_clip, cfg.vlp_grid, None if same_root else cfg.data_root,
                                     getattr(cfg, "cache_dir", None))  # fmt: skip
    return pseudo_labels.score_path(derived, cfg.vlp_clip, cfg.vlp_grid, names), fix


def _vlp_init(cfg, state: LabelState) -> None:
    """Read the score file (the stand-in is made on first use) and compute every training image's pseudo-labels for
    both flips: N x 2 x C int8 on the device, the row of each image's flip picked in the training step."""
    initial = _dense_state(cfg.loss, state)
    root, derived = Path(cfg.data_root), datasets.derived_dir(cfg)
    names = datasets.load_formatted(cfg.dataset, root, derived, label_rules.regime_of(cfg))["train"]["images"]
    path, fix = vlp_score_file(cfg, names)
    if cfg.vlp_clip == pseudo_labels.STANDIN:
        pseudo_labels.ensure_scores(cfg.dataset, root, derived, pseudo_labels.STANDIN, cfg.vlp_grid, quiet=True)
    scores, meta = pseudo_labels.open_scores(path, len(names), initial.shape[1], cfg.vlp_grid, fix)
    position = {name: i for i, name in enumerate(names.tolist())}
    rows = np.array([position[name] for name in state.train_split.image_names.tolist()], dtype=np.int64)
    rule = functools.partial(_VLP_RULES[cfg.loss], cfg)
    state.extra["vlp_pseudo"] = pseudo_label_table(scores, rows, initial.cpu(), rule).to(initial.device)
    state.extra["vlp_score_file"] = pseudo_labels.identity(meta)


def pseudo_label_table(scores: np.ndarray, rows: np.ndarray, observed: torch.Tensor, rule) -> torch.Tensor:
    """``rule`` applied to the scores of ``rows`` (in that order), unflipped and flipped: N x 2 x C int8."""
    out = torch.empty((len(rows), 2, observed.shape[1]), dtype=torch.int8)
    for start in range(0, len(rows), 4096):
        part = slice(start, start + 4096)
        similarity = torch.from_numpy(np.asarray(scores[rows[part]], dtype=np.float32))
        for flip in (0, 1):
            out[part, flip] = rule(similarity[:, flip], observed[part])
    return out


def _vlp_batch_pseudo(b: LossInputs) -> torch.Tensor:
    """The batch's pseudo-labels, of the view each image was trained on (integer indexing: nothing waits)."""
    flip = b.flip.long() if b.flip is not None else torch.zeros_like(b.rows)
    return b.state.extra["vlp_pseudo"][b.rows, flip]


def _vlp_load(state: LabelState, saved: dict) -> None:
    if saved.get("vlp_score_file") != state.extra["vlp_score_file"]:
        raise datasets.DataError("The pseudo-label score file changed since this run started (it was made again, with "
                                 "other settings or images): the run cannot resume with other pseudo-labels. Start "
                                 "it again under another --exp_name.")  # fmt: skip


def _vlp_rules(cfg) -> list[str]:
    problems = []
    standin, synthetic = cfg.vlp_clip == pseudo_labels.STANDIN, cfg.dataset == "synthetic"
    if standin and not synthetic:
        entry = REGISTRY[cfg.loss]
        scorer = for_dataset(entry.presets["vlp_clip"], cfg.dataset, "vlp_clip")
        problems.append(f"--vlp_clip standin is the synthetic data's stand-in scorer; on {cfg.dataset} the "
                        f"pseudo-labels come from a CLIP (the paper's: --vlp_clip {scorer})")  # fmt: skip
    if cfg.train_mode == "linear_init":
        problems.append(f"--loss {cfg.loss} is not offered with --train_mode linear_init (the papers train end to end)")
    return problems


def _vlpl_rules(cfg) -> list[str]:
    problems = _vlp_rules(cfg)
    if cfg.vlpl_warmup >= cfg.num_epochs:
        problems.append(f"--vlpl_warmup {cfg.vlpl_warmup} leaves no epoch with pseudo-labels ({cfg.num_epochs} "
                        "epochs)")  # fmt: skip
    return problems


def _vlpl_loss(b: LossInputs) -> torch.Tensor:
    c = b.cfg
    warming_up = b.epoch is not None and b.epoch <= c.vlpl_warmup
    pseudo = None if warming_up else _vlp_batch_pseudo(b)
    return losses_vlp.vlpl_loss(b.logits, b.observed, pseudo, alpha=c.em_alpha, beta_pos=c.vlpl_beta_pos,
                                beta_neg=c.vlpl_beta_neg, reduce=b.reduce)  # fmt: skip


register(
    Method(
        "vlpl", LOSS, title="VLPL", summary="EM plus CLIP pseudo-labels (Xing et al., CVPR Workshops 2024)",
        flags=(*_VLP_FLAGS, EM_ALPHA,
               Flag("vlpl_beta_pos", float, 0.7, "VLPL: weight of positive pseudo-labels (default: preset)",
                    check=_at_least("vlpl_beta_pos", 0)),
               Flag("vlpl_beta_neg", float, 0.0, "VLPL: weight of negative pseudo-labels (default: preset)",
                    check=_at_least("vlpl_beta_neg", 0)),
               Flag("vlpl_warmup", int, 0, "VLPL: epochs of plain EM first (default: preset)",
                    check=_at_least("vlpl_warmup", 0))),
        # mvrl/VLPL main_clip.py's flag defaults (-t 0.01, -th 0.3, -p 0.0); its scorer, CLIP ViT-L/14 at 336 px on
        # the whole image, is a general default (the synthetic entry names the stand-in under "vlpl"); em_alpha is EM's.
        presets={
            "vlp_clip": from_dataset("vlpl", "ViT-L-14-336"),
            "vlp_grid": from_dataset("vlpl", 0),
            "vlp_temperature": 0.01,
            "vlp_threshold": 0.3,
            "vlp_negatives": 0.0,
            "em_alpha": _EM_ALPHA,
            "vlpl_beta_pos": 0.7,
            "vlpl_beta_neg": 0.0,
            "vlpl_warmup": 0,
        },
        validate=_vlpl_rules, not_on=_NO_PSEUDO_LABELS, table_skip=frozenset({"openimages"}),
        loss=_vlpl_loss, init_state=_vlp_init, save_state=lambda s: {"vlp_score_file": s.extra["vlp_score_file"]},
        load_state=_vlp_load,
        paper={"end_to_end": {"pascal": 89.10, "coco": 71.45, "nuswide": 49.55, "cub": 24.02}},
    )
)  # fmt: skip


def _aevlp_rules(c) -> list[str]:
    problems = _vlp_rules(c) + _needs_expected_num_pos(c)
    if c.vlp_grid < 1:
        problems.append("--loss aevlp gates over the crops of a grid: --vlp_grid must be >= 1 (AEVLP: 4; CUB 5)")
    problems += losses.gr_problems(w=c.gr_w, b=c.gr_b, mu=c.gr_mu, sigma=c.gr_sigma, q2=c.gr_q2, q3=c.gr_q3,
                                   linear_init=0, num_epochs=c.num_epochs)  # fmt: skip
    return problems + losses_vlp.aevlp_problems(lambda1=c.aevlp_lambda[0], lambda2=c.aevlp_lambda[1], rho=c.aevlp_rho,
                                                reg=c.aevlp_reg)  # fmt: skip


def _aevlp_loss(b: LossInputs) -> torch.Tensor:
    if b.epoch is None:
        raise MethodError("AEVLP follows GR Loss's per-epoch schedule: pass epoch= to compute_loss")
    c = b.cfg
    return losses_vlp.aevlp_loss(
        b.logits, b.observed, _vlp_batch_pseudo(b), epoch=b.epoch, num_epochs=c.num_epochs, w=c.gr_w, b=c.gr_b,
        mu=c.gr_mu, sigma=c.gr_sigma, q2=c.gr_q2, q3=c.gr_q3, lambda1=c.aevlp_lambda[0], lambda2=c.aevlp_lambda[1],
        rho=c.aevlp_rho, reg=c.aevlp_reg, expected_num_pos=c.expected_num_pos, reduce=b.reduce,
    )  # fmt: skip


register(
    Method(
        "aevlp", LOSS, title="AEVLP", summary="GR Loss plus CLIP pseudo-labels, crop grid (Tran et al., ICCV 2025)",
        flags=(*_VLP_FLAGS, *_GR_FLAGS, EXPECTED_NUM_POS,
               Flag("aevlp_top_k", int, 3, "AEVLP: most positive pseudo-labels per image (default: preset)",
                    check=lambda v: None if v >= 1 else f"--aevlp_top_k must be >= 1 (got {v})"),
               Flag("aevlp_eta", float, 0.0, "AEVLP: the gate's level, max over crops above it (default: preset)",
                    check=_at_least("aevlp_eta", 0)),
               Flag("aevlp_lambda", float, (0.7, 0.4), "AEVLP: lambda1 lambda2, v clamped to [1 - l1, 1 - l2] on "
                    "positive pseudo-labels (default: preset)", nargs=2),
               Flag("aevlp_rho", float, 0.9, "AEVLP: positive pseudo-labels' target mix (default: preset)"),
               Flag("aevlp_reg", float, 0.05, "AEVLP: weight of EPR's regulariser (default: preset)")),
        # Fsoft-AIC/AEVLP's configs (configs/pascal.json, coco.json at the repository's root, configs/nuswide.json,
        # configs/cub.json, and config.py's per-dataset table): their beta [w0, wT, b0, bT], alpha [mu0, sigma0, muT,
        # sigmaT] and q2q3 are GR Loss's flags here; the per-dataset ones in the dataset entries under "aevlp". Scorer:
        # CLIP ViT-B/16 (OpenAI weights) at 224 px, 4 x 4 grid (CUB 5 x 5).
        presets={
            "vlp_clip": from_dataset("aevlp", "ViT-B-16"),
            "vlp_grid": from_dataset("aevlp", 4),
            **{flag: from_dataset("aevlp") for flag in ("vlp_temperature", "vlp_threshold", "vlp_negatives",
                                                         "aevlp_top_k", "aevlp_eta", "aevlp_lambda", "aevlp_reg",
                                                         "gr_w", "gr_b", "gr_q3")},
            "aevlp_rho": 0.9,
            "expected_num_pos": _EXPECTED_NUM_POS,
            "gr_mu": (0.5, 0.8),
            "gr_sigma": (2.0, 0.5),
            "gr_q2": 0.01,
        },
        validate=_aevlp_rules, not_on=_NO_PSEUDO_LABELS, table_skip=frozenset({"openimages"}),
        single_process="its EPR regulariser needs the whole batch in one place",
        loss=_aevlp_loss, init_state=_vlp_init, save_state=lambda s: {"vlp_score_file": s.extra["vlp_score_file"]},
        load_state=_vlp_load,
        paper={"end_to_end": {"pascal": 90.46, "coco": 73.54, "nuswide": 50.70, "cub": 24.89}},
    )
)  # fmt: skip


# The large-loss schemes: the authors' posted delta_rel per dataset, in the dataset entries under each scheme's name.


def _ll_cp_rules(cfg) -> list[str]:
    return ["--delta_rel 0 with LL-Cp corrects nothing; use --mod_scheme AN for that"] if cfg.delta_rel == 0 else []


register(
    Method(
        "LL-R", SCHEME, title="LL-R", summary="reject the largest losses among unobserved labels",
        loss=_scheme_loss, rate=_scheme_rate, flags=(DELTA_REL,),
        presets={"delta_rel": from_dataset("LL-R")},
        paper={"end_to_end": {"pascal": 89.2, "coco": 71.0, "nuswide": 47.4, "cub": 19.5, "openimages": 82.5},
               "linear_init": {"pascal": 89.4, "coco": 71.9, "nuswide": 49.1, "cub": 21.5}},
    )
)  # fmt: skip
register(
    Method(
        "LL-Ct", SCHEME, title="LL-Ct", summary="correct them to positive for the batch (temporary)",
        loss=_scheme_loss, rate=_scheme_rate, flags=(DELTA_REL,),
        presets={"delta_rel": from_dataset("LL-Ct")},
        paper={"end_to_end": {"pascal": 89.0, "coco": 70.5, "nuswide": 48.0, "cub": 20.4, "openimages": 82.6},
               "linear_init": {"pascal": 89.3, "coco": 71.6, "nuswide": 49.6, "cub": 21.8}},
    )
)  # fmt: skip
register(
    Method(
        "LL-Cp", SCHEME, title="LL-Cp", summary="correct them to positive in the label store (permanent)",
        loss=_scheme_loss, rate=_scheme_rate, flags=(DELTA_REL,), corrects_labels=True, validate=_ll_cp_rules,
        presets={"delta_rel": from_dataset("LL-Cp")},
        paper={"end_to_end": {"pascal": 88.4, "coco": 70.7, "nuswide": 48.3, "cub": 20.1, "openimages": 82.5},
               "linear_init": {"pascal": 88.3, "coco": 71.0, "nuswide": 49.4, "cub": 21.4}},
    )
)  # fmt: skip


# BoostLU: the CAM-form head with positive values boosted (models.MultiLabelClassifier), with its own delta_rel, in the
# dataset entries under each combined row ("LL-R+BoostLU"); a dataset without it refuses the combination.


def _boostlu_rules(cfg) -> list[str]:
    if cfg.train_mode == "linear_init":
        return ["--train_mode linear_init trains a linear head on pooled features; BoostLU needs the CAM form"]
    return []


_BOOSTLU_SCHEMES = ("LL-R", "LL-Ct", "LL-Cp")

register(
    Method(
        "boostlu", MODIFIER, title="BoostLU", row="BoostLU",
        summary="the CAM-form head, positive CAM values multiplied by alpha, then average pooling",
        flags=(Flag("boostlu_alpha", float, 0.0, "BoostLU's alpha; 0 = off (paper: 5)",
                    check=_at_least("boostlu_alpha", 0)),),
        validate=_boostlu_rules, active=lambda cfg: value_of(cfg, "boostlu_alpha", 0.0) > 0,
        cli=("--boostlu_alpha", "5"), applies_to=_BOOSTLU_SCHEMES, table_skip=frozenset({"openimages"}),
        presets_with={s: {"delta_rel": from_dataset(f"{s}+BoostLU")} for s in _BOOSTLU_SCHEMES},
        model_options=lambda cfg: {"boostlu_alpha": cfg.boostlu_alpha},
        paper_with={
            "LL-R": {"end_to_end": {"pascal": 89.29, "coco": 72.89, "nuswide": 49.59, "cub": 19.80}},
            "LL-Ct": {"end_to_end": {"pascal": 88.61, "coco": 71.78, "nuswide": 48.37, "cub": 19.25}},
            "LL-Cp": {"end_to_end": {"pascal": 87.81, "coco": 71.41, "nuswide": 48.61, "cub": 19.34}},
        },
        name_suffix=lambda values: f"_boostlu{values['boostlu_alpha']:g}",
    )
)  # fmt: skip


# Training modes: end to end (the paper's main table), or LinearInit (Cole et al.'s, the paper's second table).

register(Method("end_to_end", MODE, title="End-to-end", summary="fine-tune the whole network from the start"))
register(
    Method(
        "linear_init", MODE, title="LinearInit",
        summary="train the head on frozen cached features first, then fine-tune end to end",
        flags=(Flag("linear_epochs", int, 25, "LinearInit: epochs of the frozen phase",
                    check=lambda v: None if v >= 1 else f"--linear_epochs must be a positive integer (got {v})"),),
        before_training=linear_init_phase, name_suffix=lambda values: "_li",
    )
)  # fmt: skip
