"""The vision-language pseudo-label methods: VLPL (Xing et al., CVPR Workshops 2024) and AEVLP (Tran et al., ICCV
2025), one registry entry each beside the built-in ones of ``methods.py`` (whose shared flags they use). A frozen
CLIP's scores come from a score file made once per dataset and scorer (``clip_scores``, ``python pseudo_labels.py``);
the rules turn them into pseudo-labels when a run starts (docs/vlp.md). Importing this module registers them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import clip_scores
import datasets
import label_rules
import losses
import losses_vlp
from label_state import LabelState

# ---------------------------------------------------------------------------------------------------------------------
# EM+APL: asymmetric pseudo-labelling after each epoch from the warm-up on.
from methods import (
    EM_ALPHA,
    EM_ALPHA_PRESET,
    EXPECTED_NUM_POS,
    EXPECTED_NUM_POS_PRESET,
    GR_FLAGS,
    at_least,
    dense_state,
    gr_settings,
    in_range,
    needs_expected_num_pos,
)
from registry import (
    LOSS,
    REGISTRY,
    Flag,
    LossInputs,
    Method,
    MethodError,
    for_dataset,
    from_dataset,
    register,
    value_of,
)

# Vision-language pseudo-labels: VLPL (Xing et al., CVPR Workshops 2024; mvrl/VLPL) and AEVLP (Tran et al., ICCV 2025;
# Fsoft-AIC/AEVLP). A frozen CLIP's scores are computed once per dataset and scorer (pseudo_labels.py); when a run
# starts, each method's rule turns them into pseudo-labels per training image and flip (the rules need nothing from the
# model being trained), kept on the device; the training step picks the row of the flip the loader drew. docs/vlp.md.

VLP_CLIP = Flag(
    "vlp_clip",
    str,
    clip_scores.STANDIN,
    "CLIP scorer of the score file: an open_clip model name, or 'standin' (synthetic) (default: preset)",
)
VLP_GRID = Flag(
    "vlp_grid",
    int,
    4,
    "crops per side of the score file; 0: whole image only (default: preset)",
    check=in_range("vlp_grid", 0, 8),
)
VLP_TEMPERATURE = Flag(
    "vlp_temperature",
    float,
    0.01,
    "temperature of CLIP's softmax over classes (default: preset)",
    check=lambda v: None if v > 0 else f"--vlp_temperature must be > 0 (got {v})",
)
VLP_THRESHOLD = Flag(
    "vlp_threshold",
    float,
    0.5,
    "score a positive pseudo-label must reach (default: preset)",
    check=in_range("vlp_threshold", 0, 1),
)
VLP_NEGATIVES = Flag(
    "vlp_negatives",
    float,
    0.0,
    "fraction of classes, lowest scores, made negative pseudo-labels (default: preset)",
    check=in_range("vlp_negatives", 0, 1),
)
_VLP_FLAGS = (VLP_CLIP, VLP_GRID, VLP_TEMPERATURE, VLP_THRESHOLD, VLP_NEGATIVES)
_NO_PSEUDO_LABELS = {
    "openimages": "its pseudo-labels would take 3.4M images x 5,000 classes, and no prompt set is published for it"
}


def _vlpl_rule(values, similarity: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """VLPL's pseudo-labels (whole image only) with the settings in ``values`` (a config or a preset mapping)."""
    return losses_vlp.vlpl_pseudo_labels(
        similarity[..., 0, :],
        temperature=value_of(values, "vlp_temperature"),
        threshold=value_of(values, "vlp_threshold"),
        negative_fraction=value_of(values, "vlp_negatives"),
    )


def _aevlp_rule(values, similarity: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """AEVLP's DAMP pseudo-labels (whole image and crops) with the settings in ``values``."""
    return losses_vlp.aevlp_pseudo_labels(
        similarity,
        observed,
        temperature=value_of(values, "vlp_temperature"),
        threshold=value_of(values, "vlp_threshold"),
        top_k=value_of(values, "aevlp_top_k"),
        eta=value_of(values, "aevlp_eta"),
        negative_ratio=value_of(values, "vlp_negatives"),
    )


_VLP_RULES = {"vlpl": _vlpl_rule, "aevlp": _aevlp_rule}
_UNSET = object()  # a preset the dataset's entry does not hold


def pseudo_label_rules(dataset: str, grid: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``{method: rule(similarity ... x V x C, observed ... x C) -> pseudo-labels}`` with each registered method's
    preset constants for ``dataset``, for a score file of ``grid`` crops per side (AEVLP's needs crops), leaving out
    a method whose constants the dataset's entry lacks (the scoring pass reports their precision and recall)."""
    out = {}
    for name, rule in _VLP_RULES.items():
        entry = REGISTRY.get(name)
        if entry is None or dataset in entry.not_on or (grid == 0 and name == "aevlp"):
            continue
        values = {k: for_dataset(v, dataset, k, missing=_UNSET) for k, v in entry.presets.items()}
        if _UNSET not in values.values():
            out[name] = functools.partial(rule, values)
    return out


def vlp_score_file(cfg, names: np.ndarray) -> tuple[Path, str]:
    """The score file a run of ``cfg`` reads, and the one command that makes it."""
    derived = datasets.derived_dir(cfg)
    same_root = Path(cfg.data_root).resolve() == datasets.default_root(cfg.dataset).resolve()
    fix = clip_scores.make_command(
        cfg.dataset, cfg.vlp_clip, cfg.vlp_grid, None if same_root else cfg.data_root, getattr(cfg, "cache_dir", None)
    )
    return clip_scores.score_path(derived, cfg.vlp_clip, cfg.vlp_grid, names), fix


def _vlp_init(cfg, state: LabelState) -> None:
    """Read the score file (the stand-in is made on first use) and compute every training image's pseudo-labels for
    both flips: N x 2 x C int8 on the device, the row of each image's flip picked in the training step."""
    initial = dense_state(cfg.loss, state)
    root, derived = Path(cfg.data_root), datasets.derived_dir(cfg)
    names = datasets.load_formatted(cfg.dataset, root, derived, label_rules.regime_of(cfg))["train"]["images"]
    path, fix = vlp_score_file(cfg, names)
    if cfg.vlp_clip == clip_scores.STANDIN:
        rules = pseudo_label_rules(cfg.dataset, cfg.vlp_grid)
        clip_scores.ensure_scores(
            cfg.dataset, root, derived, clip_scores.STANDIN, cfg.vlp_grid, rules=rules, quiet=True
        )
    scores, meta = clip_scores.open_scores(path, len(names), initial.shape[1], cfg.vlp_grid, fix)
    position = {name: i for i, name in enumerate(names.tolist())}
    rows = np.array([position[name] for name in state.train_split.image_names.tolist()], dtype=np.int64)
    rule = functools.partial(_VLP_RULES[cfg.loss], cfg)
    state.extra["vlp_pseudo"] = pseudo_label_table(scores, rows, initial.cpu(), rule).to(initial.device)
    state.extra["vlp_score_file"] = clip_scores.identity(meta)


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
        raise datasets.DataError(
            "The pseudo-label score file changed since this run started (it was made again, with "
            "other settings or images): the run cannot resume with other pseudo-labels. Start "
            "it again under another --exp_name."
        )


def _vlp_rules(cfg) -> list[str]:
    problems = []
    standin, synthetic = cfg.vlp_clip == clip_scores.STANDIN, cfg.dataset == "synthetic"
    if standin and not synthetic:
        entry = REGISTRY[cfg.loss]
        scorer = for_dataset(entry.presets["vlp_clip"], cfg.dataset, "vlp_clip")
        problems.append(
            f"--vlp_clip standin is the synthetic data's stand-in scorer; on {cfg.dataset} the "
            f"pseudo-labels come from a CLIP (the paper's: --vlp_clip {scorer})"
        )
    if cfg.train_mode == "linear_init":
        problems.append(f"--loss {cfg.loss} is not offered with --train_mode linear_init (the papers train end to end)")
    return problems


def _vlpl_rules(cfg) -> list[str]:
    problems = _vlp_rules(cfg)
    if cfg.vlpl_warmup >= cfg.num_epochs:
        problems.append(f"--vlpl_warmup {cfg.vlpl_warmup} leaves no epoch with pseudo-labels ({cfg.num_epochs} epochs)")
    return problems


def _vlpl_loss(b: LossInputs) -> torch.Tensor:
    c = b.cfg
    warming_up = b.epoch is not None and b.epoch <= c.vlpl_warmup
    pseudo = None if warming_up else _vlp_batch_pseudo(b)
    return losses_vlp.vlpl_loss(
        b.logits,
        b.observed,
        pseudo,
        alpha=c.em_alpha,
        beta_pos=c.vlpl_beta_pos,
        beta_neg=c.vlpl_beta_neg,
        reduce=b.reduce,
    )


register(
    Method(
        "vlpl",
        LOSS,
        title="VLPL",
        summary="EM plus CLIP pseudo-labels (Xing et al., CVPR Workshops 2024)",
        flags=(
            *_VLP_FLAGS,
            EM_ALPHA,
            Flag(
                "vlpl_beta_pos",
                float,
                0.7,
                "VLPL: weight of positive pseudo-labels (default: preset)",
                check=at_least("vlpl_beta_pos", 0),
            ),
            Flag(
                "vlpl_beta_neg",
                float,
                0.0,
                "VLPL: weight of negative pseudo-labels (default: preset)",
                check=at_least("vlpl_beta_neg", 0),
            ),
            Flag(
                "vlpl_warmup",
                int,
                0,
                "VLPL: epochs of plain EM first (default: preset)",
                check=at_least("vlpl_warmup", 0),
            ),
        ),
        # mvrl/VLPL main_clip.py's flag defaults (-t 0.01, -th 0.3, -p 0.0); its scorer, CLIP ViT-L/14 at 336 px on
        # the whole image, is a general default (the synthetic entry names the stand-in under "vlpl"); em_alpha is EM's.
        presets={
            "vlp_clip": from_dataset("vlpl", "ViT-L-14-336"),
            "vlp_grid": from_dataset("vlpl", 0),
            "vlp_temperature": 0.01,
            "vlp_threshold": 0.3,
            "vlp_negatives": 0.0,
            "em_alpha": EM_ALPHA_PRESET,
            "vlpl_beta_pos": 0.7,
            "vlpl_beta_neg": 0.0,
            "vlpl_warmup": 0,
        },
        validate=_vlpl_rules,
        not_on=_NO_PSEUDO_LABELS,
        table_skip=frozenset({"openimages"}),
        loss=_vlpl_loss,
        init_state=_vlp_init,
        save_state=lambda s: {"vlp_score_file": s.extra["vlp_score_file"]},
        load_state=_vlp_load,
        paper={"end_to_end": {"pascal": 89.10, "coco": 71.45, "nuswide": 49.55, "cub": 24.02}},
    )
)


def _aevlp_rules(c) -> list[str]:
    problems = _vlp_rules(c) + needs_expected_num_pos(c)
    if c.vlp_grid < 1:
        problems.append("--loss aevlp gates over the crops of a grid: --vlp_grid must be >= 1 (AEVLP: 4; CUB 5)")
    problems += losses.gr_problems(**gr_settings(c), linear_init=0, num_epochs=c.num_epochs)
    return problems + losses_vlp.aevlp_problems(
        lambda1=c.aevlp_lambda[0], lambda2=c.aevlp_lambda[1], rho=c.aevlp_rho, reg=c.aevlp_reg
    )


def _aevlp_loss(b: LossInputs) -> torch.Tensor:
    if b.epoch is None:
        raise MethodError("AEVLP follows GR Loss's per-epoch schedule: pass epoch= to compute_loss")
    c = b.cfg
    return losses_vlp.aevlp_loss(
        b.logits,
        b.observed,
        _vlp_batch_pseudo(b),
        epoch=b.epoch,
        num_epochs=c.num_epochs,
        **gr_settings(c),
        lambda1=c.aevlp_lambda[0],
        lambda2=c.aevlp_lambda[1],
        rho=c.aevlp_rho,
        reg=c.aevlp_reg,
        expected_num_pos=c.expected_num_pos,
        reduce=b.reduce,
    )


register(
    Method(
        "aevlp",
        LOSS,
        title="AEVLP",
        summary="GR Loss plus CLIP pseudo-labels, crop grid (Tran et al., ICCV 2025)",
        flags=(
            *_VLP_FLAGS,
            *GR_FLAGS,
            EXPECTED_NUM_POS,
            Flag(
                "aevlp_top_k",
                int,
                3,
                "AEVLP: most positive pseudo-labels per image (default: preset)",
                check=lambda v: None if v >= 1 else f"--aevlp_top_k must be >= 1 (got {v})",
            ),
            Flag(
                "aevlp_eta",
                float,
                0.0,
                "AEVLP: the gate's level, max over crops above it (default: preset)",
                check=at_least("aevlp_eta", 0),
            ),
            Flag(
                "aevlp_lambda",
                float,
                (0.7, 0.4),
                "AEVLP: lambda1 lambda2, v clamped to [1 - l1, 1 - l2] on positive pseudo-labels (default: preset)",
                nargs=2,
            ),
            Flag("aevlp_rho", float, 0.9, "AEVLP: positive pseudo-labels' target mix (default: preset)"),
            Flag("aevlp_reg", float, 0.05, "AEVLP: weight of EPR's regulariser (default: preset)"),
        ),
        # Fsoft-AIC/AEVLP's configs (configs/pascal.json, coco.json at the repository's root, configs/nuswide.json,
        # configs/cub.json, and config.py's per-dataset table): their beta [w0, wT, b0, bT], alpha [mu0, sigma0, muT,
        # sigmaT] and q2q3 are GR Loss's flags here; the per-dataset ones in the dataset entries under "aevlp". Scorer:
        # CLIP ViT-B/16 (OpenAI weights) at 224 px, 4 x 4 grid (CUB 5 x 5).
        presets={
            "vlp_clip": from_dataset("aevlp", "ViT-B-16"),
            "vlp_grid": from_dataset("aevlp", 4),
            **{
                flag: from_dataset("aevlp")
                for flag in (
                    "vlp_temperature",
                    "vlp_threshold",
                    "vlp_negatives",
                    "aevlp_top_k",
                    "aevlp_eta",
                    "aevlp_lambda",
                    "aevlp_reg",
                    "gr_w",
                    "gr_b",
                    "gr_q3",
                )
            },
            "aevlp_rho": 0.9,
            "expected_num_pos": EXPECTED_NUM_POS_PRESET,
            "gr_mu": (0.5, 0.8),
            "gr_sigma": (2.0, 0.5),
            "gr_q2": 0.01,
        },
        validate=_aevlp_rules,
        not_on=_NO_PSEUDO_LABELS,
        table_skip=frozenset({"openimages"}),
        single_process="its EPR regulariser needs the whole batch in one place",
        loss=_aevlp_loss,
        init_state=_vlp_init,
        save_state=lambda s: {"vlp_score_file": s.extra["vlp_score_file"]},
        load_state=_vlp_load,
        paper={"end_to_end": {"pascal": 90.46, "coco": 73.54, "nuswide": 50.70, "cub": 24.89}},
    )
)
