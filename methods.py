"""What differs between the rows of the paper's table, for the trainer: per-method training state, the batch loss,
the diagnostics of the memorisation analysis, EM+APL's pseudo-labelling, and LinearInit's frozen-feature phase.

``train.py`` runs the loop; everything here is called from it with explicit arguments (no config object inside the
loss maths, which stays in ``losses.py``).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import datasets
import distributed
import losses
import models

# ---------------------------------------------------------------------------------------------------------------------
# The trainer's label stores: observed labels by row, LL-Cp's permanent corrections.


class DenseLabelStore:
    """The observed label matrix on the device; corrections are written in place."""

    def __init__(self, observed: np.ndarray, device: torch.device) -> None:
        self.matrix = torch.from_numpy(observed).to(device)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        return self.matrix[rows.to(self.device)]

    def correct(self, rows: torch.Tensor, selected: torch.Tensor) -> None:
        """Set the ``selected`` entries of ``rows`` to +1 (LL-Cp's permanent correction)."""
        rows = rows.to(self.device)
        self.matrix[rows] = self.matrix[rows].masked_fill(selected, 1)

    def end_epoch(self) -> None:
        pass

    def num_positive(self) -> int:
        return int((self.matrix == 1).sum())

    def state(self) -> dict:
        return {"matrix": self.matrix.cpu()}

    def load_state(self, state: dict) -> None:
        self.matrix = state["matrix"].to(self.device)

    def checksum(self) -> float:
        weights = torch.arange(self.matrix.numel(), device=self.device).remainder(9973).add(1).view_as(self.matrix)
        return float((self.matrix.double() * weights).sum())


class SparseLabelStore:
    """Sparse observed labels (OpenImages), densified per batch. Corrections are buffered and merged at the end of the
    epoch: every row is seen once per epoch, so no batch of the same epoch could have read them anyway."""

    def __init__(self, observed: datasets.SparseLabels, device: torch.device) -> None:
        self.labels, self.device = observed, device
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.labels.dense(rows.cpu().numpy())).to(self.device, non_blocking=True)

    def correct(self, rows: torch.Tensor, selected: torch.Tensor) -> None:
        r, c = selected.nonzero(as_tuple=True)
        self.pending.append((rows.cpu().numpy()[r.cpu().numpy()], c.cpu().numpy()))

    def end_epoch(self) -> None:
        if self.pending:
            rows, cols = (np.concatenate(parts) for parts in zip(*self.pending, strict=True))
            self.labels = self.labels.with_positives(rows, cols)
            self.pending = []

    def num_positive(self) -> int:
        return int((self.labels.values > 0).sum())

    def state(self) -> dict:
        return {
            part: torch.from_numpy(np.ascontiguousarray(getattr(self.labels, part)))
            for part in datasets.SparseLabels._PARTS
        }

    def load_state(self, state: dict) -> None:
        parts = [state[part].numpy() for part in datasets.SparseLabels._PARTS]
        self.labels = datasets.SparseLabels(*parts, self.labels.num_classes)

    def checksum(self) -> float:
        return float(sum(np.asarray(getattr(self.labels, p), dtype=np.float64).sum() * (i + 1) for i, p in
                         enumerate(datasets.SparseLabels._PARTS)))  # fmt: skip


def label_store(observed, device: torch.device) -> DenseLabelStore | SparseLabelStore:
    """A dense store for a label matrix, a sparse one for ``datasets.SparseLabels`` (OpenImages)."""
    if isinstance(observed, datasets.SparseLabels):
        return SparseLabelStore(observed, device)
    return DenseLabelStore(observed, device)


@dataclass
class LabelState:
    """The training labels as the trainer owns them, plus the per-image state some methods learn.

    ``observed`` is read per batch and takes LL-Cp's corrections. ``initial`` (the observed labels before any
    correction) and ``clean`` (the full labels) exist when the full labels are known (not OpenImages): they feed the
    diagnostics only, never the loss. ``estimator`` is ROLE's label estimator; ``pseudo_negative``, ``soft_label``
    and ``apl_quota`` are EM+APL's pseudo-labels and per-class quota.
    """

    observed: DenseLabelStore | SparseLabelStore
    initial: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    estimator: models.LabelEstimator | None = None
    pseudo_negative: torch.Tensor | None = None
    soft_label: torch.Tensor | None = None
    apl_quota: torch.Tensor | None = None

    def checkpoint(self) -> dict:
        """What a checkpoint must hold to resume exactly: the labels as corrected so far and what the methods learnt
        (``initial``, ``clean`` and the APL quota are rebuilt from the data)."""
        out = {"observed": self.observed.state()}
        if self.estimator is not None:
            out["estimator"] = self.estimator.state_dict()
        if self.pseudo_negative is not None:
            out["pseudo_negative"], out["soft_label"] = self.pseudo_negative.cpu(), self.soft_label.cpu()
        return out

    def restore(self, saved: dict) -> None:
        self.observed.load_state(saved["observed"])
        if self.estimator is not None:
            self.estimator.load_state_dict(saved["estimator"])
        if self.pseudo_negative is not None:
            device = self.pseudo_negative.device
            self.pseudo_negative, self.soft_label = saved["pseudo_negative"].to(device), saved["soft_label"].to(device)


def same_on_all_processes(state: LabelState, ctx) -> bool:
    """Whether every process holds the same training labels (LL-Cp's corrections must be applied identically)."""
    checksum = torch.tensor([state.observed.checksum()], dtype=torch.float64, device=state.observed.device)
    gathered = distributed.gather_rows(checksum, ctx)
    return bool((gathered == gathered[0]).all())


def build_label_state(cfg, split: datasets.Split, device: torch.device) -> LabelState:
    observed = label_store(split.observed, device)
    state = LabelState(observed)
    if isinstance(split.observed, datasets.SparseLabels):
        return state
    state.initial = observed.matrix.clone()
    state.clean = torch.from_numpy(split.labels > 0).to(device)
    if cfg.loss == "role":
        generator = torch.Generator().manual_seed(cfg.seed)
        state.estimator = models.LabelEstimator(state.initial, generator).to(device)
    if cfg.loss == "em_apl":
        state.pseudo_negative = torch.zeros_like(state.initial, dtype=torch.bool)
        state.soft_label = torch.zeros_like(state.initial, dtype=torch.float32)
        # Zhou et al.: each labelling round takes neg_proportion * (unobserved entries of the class) / (rounds).
        unobserved = (state.initial == 0).sum(0).double()
        rounds = cfg.num_epochs - cfg.apl_warmup
        state.apl_quota = (cfg.apl_neg_proportion * unobserved / rounds).floor().long()
    return state


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured method's batch loss and the entries LL selected (none for the baselines). ``select`` and
    ``reduce``: see ``losses.large_loss`` (set by the trainer when the batch spans several processes)."""
    if cfg.loss == "an":
        return losses.large_loss(logits, batch_observed, cfg.mod_scheme, rate, select=select, reduce=reduce)
    if cfg.loss == "wan":
        loss = losses.wan_loss(logits, batch_observed, reduce=reduce)
    elif cfg.loss == "lsan":
        loss = losses.lsan_loss(logits, batch_observed, cfg.ls_coef, reduce=reduce)
    elif cfg.loss == "epr":
        loss = losses.epr_loss(logits, batch_observed, cfg.expected_num_pos, reduce=reduce)
    elif cfg.loss == "role":
        loss = losses.role_loss(logits, batch_observed, state.estimator(idx), cfg.expected_num_pos, reduce=reduce)
    elif cfg.loss == "em":
        loss = losses.em_loss(logits, batch_observed, cfg.em_alpha, reduce=reduce)
    else:  # em_apl
        pseudo, soft = state.pseudo_negative[idx], state.soft_label[idx]
        loss = losses.em_loss(logits, batch_observed, cfg.em_alpha, pseudo_negative=pseudo, soft_label=soft,
                              beta=cfg.apl_beta, reduce=reduce)  # fmt: skip
    return loss, torch.zeros_like(batch_observed, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics (the paper's memorisation analysis), from the training forward passes.


class Diagnostics:
    """Per epoch, on the device: AN loss and predicted probability on false-negative entries (unobserved, truly
    positive) versus true-negative entries (unobserved, truly negative), and the number and precision (fraction truly
    positive) of the entries LL selected. "Unobserved" refers to the labels before any correction."""

    _FIELDS = ("fn_count", "fn_loss", "fn_prob", "tn_count", "tn_loss", "tn_prob", "selected", "selected_true")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, initial: torch.Tensor, clean: torch.Tensor, selected: torch.Tensor) -> None:
        logits = logits.detach().float()
        prob, an_loss = torch.sigmoid(logits), F.softplus(logits)  # softplus(z) = BCE(z, 0)
        unobserved = initial == 0
        false_neg, true_neg = unobserved & clean, unobserved & ~clean
        self.sums += torch.stack(
            [
                false_neg.sum(),
                an_loss[false_neg].sum(),
                prob[false_neg].sum(),
                true_neg.sum(),
                an_loss[true_neg].sum(),
                prob[true_neg].sum(),
                selected.sum(),
                (selected & clean).sum(),
            ]  # fmt: skip
        ).double()

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
    chosen = losses.asymmetric_pseudo_negatives(scores, state.observed.matrix, state.pseudo_negative, state.apl_quota)
    state.pseudo_negative |= chosen
    state.soft_label = torch.where(chosen, scores.float(), state.soft_label)
    return int(chosen.sum())


# ---------------------------------------------------------------------------------------------------------------------
# LinearInit: train the head on frozen, cached backbone features, then fine-tune end to end.


def feature_cache_path(cfg, split: datasets.Split) -> Path:
    """One file per (backbone weights, image size, image list): computed once, reused by every run that shares them."""
    if not cfg.use_pretrained:
        weights = f"scratch-seed{cfg.seed}"
    else:
        weights = "pretrained" if cfg.arch == "smallcnn" else cfg.pretrained_weights
    name = f"{cfg.arch}_{weights}_{cfg.image_size}px_{datasets.split_fingerprint(split)}.npy"
    return Path(cfg.data_root) / "features" / name


@torch.inference_mode()
def cached_features(
    cfg, model: models.MultiLabelClassifier, split: datasets.Split, device: torch.device
) -> torch.Tensor:
    """Pooled backbone features of every image of ``split`` (no augmentation, BatchNorm in eval mode), on ``device``."""
    path = feature_cache_path(cfg, split)
    if path.exists():
        print(f"LinearInit: cached features {path}")
        return torch.from_numpy(np.load(path)).to(device)
    model.eval()
    loader = datasets.make_loader(split, cfg, train=False, pin_memory=device.type == "cuda")
    feats = [
        model.pool_features(model.backbone(datasets.to_model_input(images.to(device)))).float().cpu()
        for images, _ in tqdm(loader, desc=f"features {path.name}", leave=False, file=sys.stderr)
    ]
    array = torch.cat(feats).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_npy_atomic(path, array)
    print(f"LinearInit: features computed once and cached in {path}")
    return torch.from_numpy(array).to(device)


def make_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """The official optimiser over parameter groups that carry their own lr: Adam without weight decay, or SGD with
    momentum 0.9 and weight decay 1e-3."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=1e-3)


def train_linear_head(
    cfg, model, state: LabelState, train_feats, val_feats, val_labels, evaluate_scores, log, after_epoch=None
) -> dict:
    """Phase 1 of LinearInit: ``cfg.linear_epochs`` epochs of the head alone (and ROLE's estimator) on cached features,
    with the configured loss and no LL modification. The best-val head is loaded into ``model`` for phase 2.
    ``after_epoch()`` runs after each epoch (the trainer stops there on a SIGINT)."""
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr * cfg.lr_mult}]
    if state.estimator is not None:
        groups.append({"params": list(state.estimator.parameters()), "lr": cfg.lr * cfg.lr_mult})
    optimizer = make_optimizer(cfg, groups)
    batches = datasets.EpochBatches(len(train_feats), cfg.bsize, shuffle=True, seed=cfg.seed + 1)
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
                copy.deepcopy(state.estimator and state.estimator.state_dict()),
            )
        if after_epoch is not None:
            after_epoch()
    model.head.load_state_dict(best_states[0])
    if state.estimator is not None:
        state.estimator.load_state_dict(best_states[1])
    return best
