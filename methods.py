"""The built-in methods: one registry entry each (``register(Method(...))``; the machinery is ``registry.py``).

A baseline loss, an LL scheme, BoostLU, a training mode (LinearInit), the full-label variant, the CLIP pseudo-label
methods: each entry carries its batch loss (the maths stays in ``losses.py`` and ``losses_vlp.py``), its flags and
presets, its checks and hooks, its report row and its published numbers. Adding a method is one entry here, its loss
and its test (docs/extending.md). Importing this module fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import datasets
import losses
import models
from label_state import LabelState
from linear_init import linear_init_phase
from registry import (
    LOSS,
    MODE,
    MODIFIER,
    OBSERVED,
    SCHEME,
    VARIANT,
    Flag,
    LossInputs,
    Method,
    MethodError,
    from_dataset,
    get,
    register,
    value_of,
)

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


def in_range(name: str, low: float, high: float, *, low_open=False, high_open=False) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return None
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f"--{name} must lie in {interval} (got {value})"

    return check


def at_least(name: str, low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"--{name} must be >= {low:g} (got {value})"


def needs_expected_num_pos(cfg) -> list[str]:
    info = datasets.DATASET_INFO.get(cfg.dataset)
    if info is not None and cfg.expected_num_pos > info.num_classes:
        return [
            f"--expected_num_pos is the expected number of positive labels per image: at most the "
            f"{info.num_classes} classes of {info.title} (got {cfg.expected_num_pos:g})"
        ]
    if cfg.expected_num_pos > 0:
        return []
    return [f"--loss {cfg.loss} needs --expected_num_pos > 0 (got {cfg.expected_num_pos})"]


def dense_state(method: str, state: LabelState) -> torch.Tensor:
    if state.initial is None:
        raise MethodError(
            f"{method} keeps per-image state over the dense observed-label matrix, which sparse datasets "
            "do not have; add them to its not_on"
        )
    return state.initial


# The variants: single positive (observed) labels, or the full labels (the upper bound).


def _clean_rules(cfg) -> list[str]:
    problems = []
    if (cfg.num_pos, cfg.num_neg, cfg.label_proportion) != (1, 0, None):
        problems.append(
            "--num_pos, --num_neg and --label_proportion choose the observed labels; with "
            "--train_set_variant clean every label is known: drop them"
        )
    if cfg.mod_scheme != "AN" or cfg.loss != "an":
        problems.append(
            "--train_set_variant clean trains on full labels with plain BCE: no entry is unobserved, so there is "
            "nothing to reject, correct or regularise; use --mod_scheme AN --loss an (the defaults with clean)"
        )
    info = datasets.DATASET_INFO.get(cfg.dataset)
    if info is not None and info.sparse:
        problems.append(
            f"{info.title} has partial labels only, no full labels: --train_set_variant clean is not available for it"
        )
    return problems


register(Method(OBSERVED, VARIANT, summary="the observed (partial) labels: single positive by default"))
register(
    Method(
        "clean",
        VARIANT,
        title="Full label",
        row="full",
        summary="plain BCE on the full labels (the upper bound)",
        validate=_clean_rules,
        paper={
            "end_to_end": {"pascal": 90.2, "coco": 78.0, "nuswide": 54.5, "cub": 32.9},
            "linear_init": {"pascal": 91.1, "coco": 77.2, "nuswide": 54.9, "cub": 34.0},
        },
    )
)


# The LL schemes modify the AN loss (losses.large_loss); AN itself modifies nothing.


def _scheme_loss(b: LossInputs):
    return losses.large_loss(b.logits, b.observed, b.cfg.mod_scheme, b.rate, select=b.select, reduce=b.reduce)


def _scheme_rate(cfg, epoch: int) -> float:
    return losses.modification_rate(cfg.mod_scheme, epoch, cfg.delta_rel)


DELTA_REL = Flag(
    "delta_rel",
    float,
    0.0,
    "percent per epoch (default: preset)",
    check=in_range("delta_rel", 0, 100),
    always_preset=True,
)

register(
    Method(
        "AN",
        SCHEME,
        title="Naive AN",
        summary="assume negative: unobserved labels are negatives, nothing modified",
        loss=_scheme_loss,
        rate=_scheme_rate,
        flags=(DELTA_REL,),
        presets={"delta_rel": 0.0},
        paper={
            "end_to_end": {"pascal": 85.1, "coco": 64.1, "nuswide": 42.0, "cub": 19.1, "openimages": 82.0},
            "linear_init": {"pascal": 86.9, "coco": 68.7, "nuswide": 47.6, "cub": 20.9},
        },
    )
)


# The baseline losses (losses.py), each on the same protocol.


def _an_loss(b: LossInputs):
    """AN's loss, as modified by the configured scheme."""
    return get(b.cfg.mod_scheme, SCHEME).loss(b)


register(
    Method(
        "an",
        LOSS,
        summary="the AN loss, modified by --mod_scheme (AN, LL-R, LL-Ct, LL-Cp)",
        loss=_an_loss,
        combines_with_schemes=True,
    )
)
register(
    Method(
        "wan",
        LOSS,
        title="WAN",
        summary="weak AN: unobserved negatives weighted 1 / (C - 1)",
        loss=lambda b: losses.wan_loss(b.logits, b.observed, reduce=b.reduce),
        paper={
            "end_to_end": {"pascal": 86.5, "coco": 64.8, "nuswide": 46.3, "cub": 20.3, "openimages": 77.0},
            "linear_init": {"pascal": 87.1, "coco": 68.0, "nuswide": 47.5, "cub": 21.1},
        },
    )
)
register(
    Method(
        "lsan",
        LOSS,
        title="LSAN",
        summary="AN with label smoothing",
        flags=(Flag("ls_coef", float, 0.1, "LSAN label smoothing", check=in_range("ls_coef", 0, 0.5, high_open=True)),),
        loss=lambda b: losses.lsan_loss(b.logits, b.observed, b.cfg.ls_coef, reduce=b.reduce),
        paper={
            "end_to_end": {"pascal": 86.7, "coco": 66.9, "nuswide": 44.9, "cub": 17.9, "openimages": 75.0},
            "linear_init": {"pascal": 86.5, "coco": 69.2, "nuswide": 50.5, "cub": 16.6},
        },
    )
)

# Cole et al.'s expected number of positives per image (their paper; the synthetic data's true mean), in the dataset
# entries under "epr"; ROLE reads the same. OpenImages has none: EPR and ROLE are not offered there, and its runs
# record the flag's default 0.
EXPECTED_NUM_POS = Flag("expected_num_pos", float, 0.0, "EPR/ROLE (default: preset)", always_preset=True)
EXPECTED_NUM_POS_PRESET = from_dataset("epr")
_NO_EXPECTED_COUNT = {"openimages": "no expected number of positives is published for it"}

register(
    Method(
        "epr",
        LOSS,
        title="EPR",
        summary="observed labels plus the expected-positive regulariser",
        flags=(EXPECTED_NUM_POS,),
        presets={"expected_num_pos": EXPECTED_NUM_POS_PRESET},
        validate=needs_expected_num_pos,
        not_on=_NO_EXPECTED_COUNT,
        single_process="its regulariser needs the whole batch in one place",
        loss=lambda b: losses.epr_loss(b.logits, b.observed, b.cfg.expected_num_pos, reduce=b.reduce),
        paper={
            "end_to_end": {"pascal": 85.5, "coco": 63.3, "nuswide": 46.0, "cub": 20.0},
            "linear_init": {"pascal": 84.9, "coco": 66.8, "nuswide": 48.1, "cub": 21.2},
        },
    )
)


def _role_init(cfg, state: LabelState) -> None:
    generator = torch.Generator().manual_seed(cfg.seed)
    initial = dense_state("ROLE", state)
    state.extra["estimator"] = models.LabelEstimator(initial, generator).to(state.observed.device)


def _role_loss(b: LossInputs):
    estimated = b.state.extra["estimator"](b.rows)
    return losses.role_loss(b.logits, b.observed, estimated, b.cfg.expected_num_pos, reduce=b.reduce)


def _role_load(state: LabelState, saved: dict) -> None:
    state.extra["estimator"].load_state_dict(saved["estimator"])


register(
    Method(
        "role",
        LOSS,
        title="ROLE",
        summary="a per-image label estimator trained jointly, with EPR's regulariser",
        flags=(EXPECTED_NUM_POS,),
        presets={"expected_num_pos": EXPECTED_NUM_POS_PRESET},
        validate=needs_expected_num_pos,
        not_on=_NO_EXPECTED_COUNT,
        single_process="its regulariser needs the whole batch in one place, and its estimator has a row per image",
        loss=_role_loss,
        init_state=_role_init,
        save_state=lambda s: {"estimator": s.extra["estimator"].state_dict()},
        load_state=_role_load,
        parameters=lambda s: list(s.extra["estimator"].parameters()),
        paper={
            "end_to_end": {"pascal": 87.9, "coco": 66.3, "nuswide": 43.1, "cub": 15.0},
            "linear_init": {"pascal": 88.2, "coco": 69.0, "nuswide": 51.0, "cub": 16.8},
        },
    )
)

# Zhou et al.'s released per-dataset defaults, in the dataset entries: em_alpha under "em" (EM+APL reads the same),
# apl_beta and apl_warmup under "em_apl".
EM_ALPHA = Flag(
    "em_alpha", float, 0.1, "EM entropy weight (default: preset)", check=at_least("em_alpha", 0), always_preset=True
)
EM_ALPHA_PRESET = from_dataset("em")

register(
    Method(
        "em",
        LOSS,
        title="EM",
        summary="entropy maximisation on unobserved labels",
        flags=(EM_ALPHA,),
        presets={"em_alpha": EM_ALPHA_PRESET},
        table_skip=frozenset({"openimages"}),
        loss=lambda b: losses.em_loss(b.logits, b.observed, b.cfg.em_alpha, reduce=b.reduce),
    )
)


def _apl_rules(cfg) -> list[str]:
    if 1 <= cfg.apl_warmup < cfg.num_epochs:
        return []
    return [f"--apl_warmup must lie in [1, num_epochs) (got {cfg.apl_warmup} with {cfg.num_epochs} epochs)"]


def _apl_init(cfg, state: LabelState) -> None:
    initial = dense_state("EM+APL", state)
    state.extra["pseudo_negative"] = torch.zeros_like(initial, dtype=torch.bool)
    state.extra["soft_label"] = torch.zeros_like(initial, dtype=torch.float32)
    # Zhou et al.: each labelling round takes neg_proportion * (unobserved entries of the class) / (rounds).
    unobserved = (initial == 0).sum(0).double()
    rounds = cfg.num_epochs - cfg.apl_warmup
    state.extra["apl_quota"] = (cfg.apl_neg_proportion * unobserved / rounds).floor().long()


def _apl_loss(b: LossInputs):
    pseudo, soft = b.state.extra["pseudo_negative"][b.rows], b.state.extra["soft_label"][b.rows]
    return losses.em_loss(
        b.logits,
        b.observed,
        b.cfg.em_alpha,
        pseudo_negative=pseudo,
        soft_label=soft,
        beta=b.cfg.apl_beta,
        reduce=b.reduce,
    )


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
        "em_apl",
        LOSS,
        title="EM+APL",
        summary="EM plus asymmetric pseudo-labelling of negatives after each epoch",
        flags=(
            EM_ALPHA,
            Flag(
                "apl_beta",
                float,
                0.2,
                "APL pseudo-label weight (default: preset)",
                check=at_least("apl_beta", 0),
                always_preset=True,
            ),
            Flag("apl_warmup", int, 5, "APL's first labelling epoch (default: preset)", always_preset=True),
            Flag(
                "apl_neg_proportion",
                float,
                0.9,
                "APL: share of unobserved labelled",
                check=in_range("apl_neg_proportion", 0, 1, low_open=True),
            ),
        ),
        presets={
            "em_alpha": EM_ALPHA_PRESET,
            "apl_beta": from_dataset("em_apl"),
            "apl_warmup": from_dataset("em_apl"),
        },
        validate=_apl_rules,
        not_on={"openimages": "its per-image pseudo-labels would take 3.4M x 5,000 entries"},
        loss=_apl_loss,
        init_state=_apl_init,
        save_state=_apl_save,
        load_state=_apl_load,
        after_epoch=_apl_after_epoch,
        scores_train_set=True,
        paper={"end_to_end": {"pascal": 89.19, "coco": 70.87, "nuswide": 47.59, "cub": 21.84}},  # BoostLU's table
    )
)


# GR Loss (Chen et al., IJCAI 2024): the authors' released defaults, a general default for every dataset (they publish
# no per-dataset values; docs/gr_loss.md). A dataset entry may hold its own under "gr".


def gr_settings(c) -> dict:
    """GR Loss's constants of a config, as ``losses.gr_loss`` and ``losses.gr_problems`` take them (AEVLP's too)."""
    return {"w": c.gr_w, "b": c.gr_b, "mu": c.gr_mu, "sigma": c.gr_sigma, "q2": c.gr_q2, "q3": c.gr_q3}


def _gr_loss(b: LossInputs) -> torch.Tensor:
    c = b.cfg
    if b.epoch is None:  # LinearInit's frozen phase: the authors' --linear_init holds the schedule at its start there
        epoch, num_epochs, linear_init = 1, c.linear_epochs + c.num_epochs, c.linear_epochs
    else:  # the same schedule as the authors' after their --linear_init epochs: it spans the end-to-end epochs
        epoch, num_epochs, linear_init = b.epoch, c.num_epochs, 0
    return losses.gr_loss(
        b.logits,
        b.observed,
        epoch=epoch,
        num_epochs=num_epochs,
        **gr_settings(c),
        linear_init=linear_init,
        reduce=b.reduce,
    )


def _gr_rules(c) -> list[str]:
    return losses.gr_problems(**gr_settings(c), linear_init=0, num_epochs=c.num_epochs)


_GR_PAIRS, _GR_SCALARS = ("w", "b", "mu", "sigma"), ("q2", "q3")
_GR_SYNTHETIC = losses.GR_RELEASED
GR_FLAGS = tuple(
    Flag(f"gr_{k}", float, tuple(_GR_SYNTHETIC[k]), f"GR {k}: start and end values (default: preset)", nargs=2)
    for k in _GR_PAIRS
) + tuple(Flag(f"gr_{k}", float, _GR_SYNTHETIC[k], f"GR {k} (default: preset)") for k in _GR_SCALARS)
register(
    Method(
        "gr",
        LOSS,
        title="GR Loss",
        summary="generalised robust loss, soft pseudo-labels (Chen et al., IJCAI 2024)",
        flags=GR_FLAGS,
        presets={
            f"gr_{k}": from_dataset("gr", tuple(_GR_SYNTHETIC[k]) if k in _GR_PAIRS else _GR_SYNTHETIC[k])
            for k in _GR_PAIRS + _GR_SCALARS
        },
        validate=_gr_rules,
        loss=_gr_loss,
        table_skip=frozenset({"openimages"}),  # not in the paper's OpenImages table
        paper={"end_to_end": {d: v for d, v in losses.GR_PAPER_MAP.items() if v is not None}},
    )
)


# The large-loss schemes: the authors' posted delta_rel per dataset, in the dataset entries under each scheme's name.


def _ll_cp_rules(cfg) -> list[str]:
    return ["--delta_rel 0 with LL-Cp corrects nothing; use --mod_scheme AN for that"] if cfg.delta_rel == 0 else []


register(
    Method(
        "LL-R",
        SCHEME,
        title="LL-R",
        summary="reject the largest losses among unobserved labels",
        loss=_scheme_loss,
        rate=_scheme_rate,
        flags=(DELTA_REL,),
        presets={"delta_rel": from_dataset("LL-R")},
        paper={
            "end_to_end": {"pascal": 89.2, "coco": 71.0, "nuswide": 47.4, "cub": 19.5, "openimages": 82.5},
            "linear_init": {"pascal": 89.4, "coco": 71.9, "nuswide": 49.1, "cub": 21.5},
        },
    )
)
register(
    Method(
        "LL-Ct",
        SCHEME,
        title="LL-Ct",
        summary="correct them to positive for the batch (temporary)",
        loss=_scheme_loss,
        rate=_scheme_rate,
        flags=(DELTA_REL,),
        presets={"delta_rel": from_dataset("LL-Ct")},
        paper={
            "end_to_end": {"pascal": 89.0, "coco": 70.5, "nuswide": 48.0, "cub": 20.4, "openimages": 82.6},
            "linear_init": {"pascal": 89.3, "coco": 71.6, "nuswide": 49.6, "cub": 21.8},
        },
    )
)
register(
    Method(
        "LL-Cp",
        SCHEME,
        title="LL-Cp",
        summary="correct them to positive in the label store (permanent)",
        loss=_scheme_loss,
        rate=_scheme_rate,
        flags=(DELTA_REL,),
        corrects_labels=True,
        validate=_ll_cp_rules,
        presets={"delta_rel": from_dataset("LL-Cp")},
        paper={
            "end_to_end": {"pascal": 88.4, "coco": 70.7, "nuswide": 48.3, "cub": 20.1, "openimages": 82.5},
            "linear_init": {"pascal": 88.3, "coco": 71.0, "nuswide": 49.4, "cub": 21.4},
        },
    )
)


# BoostLU: the CAM-form head with positive values boosted (models.MultiLabelClassifier), with its own delta_rel, in the
# dataset entries under each combined row ("LL-R+BoostLU"); a dataset without it refuses the combination.


def _boostlu_rules(cfg) -> list[str]:
    if cfg.train_mode == "linear_init":
        return ["--train_mode linear_init trains a linear head on pooled features; BoostLU needs the CAM form"]
    return []


_BOOSTLU_SCHEMES = ("LL-R", "LL-Ct", "LL-Cp")

register(
    Method(
        "boostlu",
        MODIFIER,
        title="BoostLU",
        row="BoostLU",
        summary="the CAM-form head, positive CAM values multiplied by alpha, then average pooling",
        flags=(
            Flag(
                "boostlu_alpha", float, 0.0, "BoostLU's alpha; 0 = off (paper: 5)", check=at_least("boostlu_alpha", 0)
            ),
        ),
        validate=_boostlu_rules,
        active=lambda cfg: value_of(cfg, "boostlu_alpha", 0.0) > 0,
        cli=("--boostlu_alpha", "5"),
        applies_to=_BOOSTLU_SCHEMES,
        table_skip=frozenset({"openimages"}),
        presets_with={s: {"delta_rel": from_dataset(f"{s}+BoostLU")} for s in _BOOSTLU_SCHEMES},
        model_options=lambda cfg: {"boostlu_alpha": cfg.boostlu_alpha},
        paper_with={
            "LL-R": {"end_to_end": {"pascal": 89.29, "coco": 72.89, "nuswide": 49.59, "cub": 19.80}},
            "LL-Ct": {"end_to_end": {"pascal": 88.61, "coco": 71.78, "nuswide": 48.37, "cub": 19.25}},
            "LL-Cp": {"end_to_end": {"pascal": 87.81, "coco": 71.41, "nuswide": 48.61, "cub": 19.34}},
        },
        name_suffix=lambda values: f"_boostlu{values['boostlu_alpha']:g}",
    )
)


# Training modes: end to end (the paper's main table), or LinearInit (Cole et al.'s, the paper's second table).

register(Method("end_to_end", MODE, title="End-to-end", summary="fine-tune the whole network from the start"))
register(
    Method(
        "linear_init",
        MODE,
        title="LinearInit",
        summary="train the head on frozen cached features first, then fine-tune end to end",
        flags=(
            Flag(
                "linear_epochs",
                int,
                25,
                "LinearInit: epochs of the frozen phase",
                check=lambda v: None if v >= 1 else f"--linear_epochs must be a positive integer (got {v})",
            ),
        ),
        before_training=linear_init_phase,
        name_suffix=lambda values: "_li",
    )
)
