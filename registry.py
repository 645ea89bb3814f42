"""The method registry: what differs between the rows of the paper's table, for the trainer, in one place.

``REGISTRY`` holds one entry per method (a baseline loss, an LL scheme, BoostLU, a training mode, the full-label
variant), registered by ``methods.py``, which holds the built-in entries. An entry carries the method's batch loss,
its flags with their presets (per dataset: read from the dataset entries), its checks, its per-image state and
checkpoint hooks, its per-epoch hook, where it is not offered, its report row and its published numbers.
``config.py`` builds the flags, presets and checks from it; ``report.py`` and ``scripts/reproduce_table.sh`` read its
rows; ``train.py`` calls the hooks through the functions of the "for the trainer" section. The registry is empty until
``methods`` is imported: every tool imports it through ``config``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

import datasets
import label_rules
import losses
from label_state import LabelState, label_store

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
        p.append(
            f"per-dataset values of {', '.join('--' + f for f in per_dataset)} belong in the dataset entries: "
            "presets={flag: from_dataset(key)} here, method_constants={key: {flag: value}} in each "
            "datasets.DATASET_INFO entry (docs/extending.md)"
        )
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


def _filled() -> dict[str, Method]:
    """``REGISTRY``, once ``methods`` has filled it: an empty registry is a missing import, never "no methods"."""
    if not REGISTRY:
        raise RuntimeError("the method registry is empty: import methods (the built-in entries) before using it")
    return REGISTRY


def entries(kind: str | None = None) -> list[Method]:
    """The registered entries (of one kind), in registration order."""
    return [m for m in _filled().values() if kind is None or m.kind == kind]


def names(kind: str) -> tuple[str, ...]:
    return tuple(m.name for m in entries(kind))


def get(name: str, kind: str) -> Method:
    """The entry ``name`` of ``kind``; ``MethodError`` naming the registered ones if there is none."""
    method = _filled().get(name)
    if method is None or method.kind != kind:
        flag = f"--{SELECTOR[kind]} " if kind in SELECTOR else ""
        raise MethodError(f"unknown {kind} {flag}{name!r}: registered are {', '.join(names(kind)) or 'none'}")
    return method


def flags() -> dict[str, Flag]:
    """Every flag the entries own, by name, in registration order."""
    out: dict[str, Flag] = {}
    for method in _filled().values():
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
