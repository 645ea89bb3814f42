"""Training and evaluation: ``train_one_epoch`` and ``evaluate`` return plain dicts, ``run(cfg)`` does a whole run.

The trainer owns the training label matrix (observed labels, -1/0/1, on the device): the loader only yields images and
row indices, so LL-Cp's permanent corrections are written where every later batch reads them, whatever the workers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import datasets
import losses
import methods
import metrics
import models
from config import REPO_DIR, Config

EARLY_STOP_DROP = 3.0  # stop when val mAP falls more than this many points below the best so far (official rule)
NONFINITE_CHECK_EVERY = 25  # steps between host-side checks of the running loss


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what to try."""


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device cpu.")
    return torch.device("cuda", cfg.gpu_num)


def autocast_for(cfg: Config, device: torch.device):
    """The autocast context, chosen once: bf16 on CUDA unless --precision fp32 (or asked for on CPU), else off. The
    loss and LL's top-k selection run in fp32 whatever this is (``losses.large_loss`` casts the logits)."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_bf16)


def build_optimizer(cfg: Config, model: models.MultiLabelClassifier, estimator=None) -> torch.optim.Optimizer:
    """The official optimiser: backbone at ``lr``, head (and ROLE's label estimator) at ``lr * lr_mult``; Adam without
    weight decay, or SGD with momentum 0.9 and weight decay 1e-3."""
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.lr * cfg.lr_mult},
    ]
    if estimator is not None:
        groups.append({"params": list(estimator.parameters()), "lr": cfg.lr * cfg.lr_mult})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=1e-3)


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise TrainingError(
            f"The training loss became NaN or infinite at epoch {epoch}, by step {step}. "
            "Lower --lr (or check the data for corrupt labels) and start a new run."
        )


def train_one_epoch(
    cfg: Config,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    state: methods.LabelState,
    *,
    rate: float,
    epoch: int,
    device: torch.device,
    amp=contextlib.nullcontext,
) -> dict:
    """One pass over the training set. The label state takes LL-Cp's corrections; diagnostics are collected from the
    same forward passes when the full labels are known."""
    model.train()
    sampler: datasets.EpochBatches = loader.batch_sampler
    sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    num_selected = torch.zeros((), dtype=torch.long, device=device)
    diagnostics = methods.Diagnostics(device) if state.clean is not None else None
    num_batches = len(loader)
    for step, (images, idx) in enumerate(tqdm(loader, desc=f"epoch {epoch} train", leave=False, file=sys.stderr), 1):
        x = datasets.to_model_input(images.to(device, non_blocking=True), sampler.flips[idx].to(device))
        batch_observed = state.observed.batch(idx)
        idx = idx.to(device, non_blocking=True)
        with amp():
            logits = model(x)
        loss, selected = methods.compute_loss(cfg, logits, batch_observed, idx, rate, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.mod_scheme == "LL-Cp":  # permanent correction: later epochs see these entries as observed positives
            state.observed.set_positive(idx, batch_observed, selected)
        if diagnostics is not None:
            diagnostics.update(logits, state.initial[idx], state.clean[idx], selected)
        loss_sum += loss.detach()
        num_selected += selected.sum()
        if step % NONFINITE_CHECK_EVERY == 0 or step == num_batches:
            _check_finite(loss_sum, epoch, step)
    state.observed.end_epoch()
    stats = {"train_loss": float(loss_sum) / max(num_batches, 1), "num_selected": int(num_selected)}
    if diagnostics is not None:
        stats.update(diagnostics.summary())
        if cfg.mod_scheme == "LL-Cp":
            stats.update(methods.corrected_labels_summary(state))
    return stats


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    desc: str,
    amp=contextlib.nullcontext,
) -> torch.Tensor:
    """Sigmoid scores of every image in loader order, kept on the device (no host synchronisation per batch)."""
    model.eval()
    scores = []
    for images, _ in tqdm(loader, desc=desc, leave=False, file=sys.stderr):
        with amp():
            logits = model(datasets.to_model_input(images.to(device, non_blocking=True)))
        scores.append(torch.sigmoid(logits.float()))
    return torch.cat(scores)


def average_precision(scores: torch.Tensor, labels: torch.Tensor | datasets.SparseLabels) -> torch.Tensor:
    """Per-class AP: against full labels, or, for partial labels (OpenImages), over the annotated entries only."""
    if isinstance(labels, datasets.SparseLabels):
        rows, cols, values = (torch.from_numpy(a).to(scores.device) for a in labels.entries())
        return metrics.average_precision_entries(scores[rows, cols], values > 0, cols, labels.num_classes)
    return metrics.average_precision(scores, labels)


def evaluate(model, loader, labels, device, desc="eval", class_groups=None, amp=contextlib.nullcontext) -> dict:
    """mAP and per-class AP in percent (NaN-free: a class without scored entries is left out and listed as None);
    with ``class_groups``, the mAP of each group (G1 the rarest) too. mAP is computed on the device."""
    ap = 100.0 * average_precision(predict(model, loader, device, desc, amp), labels).cpu().double()
    result = {"map": float(ap.nanmean()), "ap_per_class": [None if a != a else a for a in ap.tolist()]}
    if class_groups is not None:
        groups = torch.from_numpy(class_groups)
        result["group_map"] = {f"G{g + 1}": float(ap[groups == g].nanmean()) for g in range(int(groups.max()) + 1)}
    return result


def eval_labels(split: datasets.Split, device: torch.device) -> torch.Tensor | datasets.SparseLabels:
    """What a split is scored against: full labels on the device, or the sparse annotated entries."""
    if isinstance(split.labels, datasets.SparseLabels):
        return split.labels
    return torch.from_numpy(split.labels).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# A whole run.


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder and write ``config.json``; never reuse a folder that already holds anything."""
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(
            f"The run folder {run_dir} already exists and is not empty; nothing was overwritten. "
            "Choose another --exp_name (or --save_path), or move the old run away."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    return run_dir


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_header(cfg: Config, run_dir: Path, device: torch.device) -> None:
    print(f"git {git_sha()}  torch {torch.__version__}  device {device}  run folder {run_dir}")
    for key, value in sorted(cfg.to_dict().items()):
        if key != "from_preset":
            print(f"  {key:18s} {value}{'   (preset)' if key in cfg.from_preset else ''}")


def build_model(cfg: Config, num_classes: int) -> models.MultiLabelClassifier:
    smallcnn_weights = None
    if cfg.arch == "smallcnn" and cfg.use_pretrained and cfg.dataset == "synthetic":
        import synthetic

        smallcnn_weights = synthetic.ensure_pretrained_backbone(cfg.data_root)
    return models.build_model(
        cfg.arch,
        num_classes,
        use_pretrained=cfg.use_pretrained,
        weights_name=cfg.pretrained_weights,
        smallcnn_weights=smallcnn_weights,
        boostlu_alpha=cfg.boostlu_alpha,
    )


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _scores_map(scores: torch.Tensor, labels) -> float:
    return float(100.0 * average_precision(scores, labels).nanmean())


def build_loaders(cfg: Config, data: datasets.Data, device: torch.device) -> dict:
    """train (shuffled, flipped), val and test loaders; with ``--cache disk`` each reads its split's disk cache, built
    first if needed. EM+APL also gets the training images in row order."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if cfg.loss == "em_apl":
        splits["train_rows"] = data.train
    caches = {}
    if cfg.cache == "disk":
        builders = cfg.num_workers or 1
        for name, split in splits.items():
            path = datasets.disk_cache_path(split, cfg.image_size, cfg.data_root)
            caches[name] = datasets.build_disk_cache(split, cfg.image_size, path, builders)
    pin = device.type == "cuda"
    return {
        name: datasets.make_loader(split, cfg, train=name == "train", pin_memory=pin, cache=caches.get(name))
        for name, split in splits.items()
    }


def linear_init(cfg: Config, model, data: datasets.Data, state: methods.LabelState, device, log) -> None:
    """LinearInit's first phase (frozen backbone, cached features); the best head is left in ``model``."""
    train_feats = methods.cached_features(cfg, model, data.train, device)
    val_feats = methods.cached_features(cfg, model, data.val, device)
    best = methods.train_linear_head(
        cfg, model, state, train_feats, val_feats, eval_labels(data.val, device), _scores_map, log
    )
    print(f"LinearInit: best head from linear epoch {best['epoch']} (val mAP {best['val_map']:.2f}); fine-tuning")


def run(cfg: Config) -> dict:
    """Train with the configured method, keep the best-val weights, score them on test; returns ``final.json``."""
    started = time.time()
    device = resolve_device(cfg)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    data = datasets.build_data(cfg)  # before the run folder exists: a data error leaves nothing behind
    run_dir = prepare_run_dir(cfg)
    print_header(cfg, run_dir, device)
    print(f"images: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes).to(device, memory_format=torch.channels_last)
    state = methods.build_label_state(cfg, data.train, device)
    loaders = build_loaders(cfg, data, device)
    amp = autocast_for(cfg, device)
    forward = torch.compile(model) if cfg.compile else model  # same parameters; state_dict() stays on ``model``
    val_labels = eval_labels(data.val, device)

    def log(record: dict) -> None:
        _append_jsonl(run_dir / "log.jsonl", record)
        extra = f"  selected {record['num_selected']:6d}" if "num_selected" in record else ""
        print(f"{record['phase']:10s} epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}{extra}"
              f"  val mAP {record['val_map']:6.2f}")  # fmt: skip

    if cfg.train_mode == "linear_init":
        linear_init(cfg, model, data, state, device, log)
    optimizer = build_optimizer(cfg, model, state.estimator)
    best = {"val_map": -1.0, "epoch": 0}
    early_stopped = False
    for epoch in range(1, cfg.num_epochs + 1):
        epoch_start = time.time()
        rate = losses.modification_rate(cfg.mod_scheme, epoch, cfg.delta_rel)
        positives_at_start = state.observed.num_positive()
        stats = train_one_epoch(
            cfg, forward, loaders["train"], optimizer, state, rate=rate, epoch=epoch, device=device, amp=amp
        )
        if cfg.loss == "em_apl" and epoch >= cfg.apl_warmup:  # scores in row order: the unshuffled train loader
            train_scores = predict(forward, loaders["train_rows"], device, f"epoch {epoch} APL", amp)
            stats["pseudo_labelled"] = methods.pseudo_label_negatives(train_scores, state)
        val_map = evaluate(forward, loaders["val"], val_labels, device, f"epoch {epoch} val", amp=amp)["map"]
        record = {
            "phase": "end_to_end",
            "epoch": epoch,
            "rate": rate,
            **stats,
            "observed_positives": positives_at_start,
        }
        record.update(val_map=val_map, seconds=round(time.time() - epoch_start, 3))
        log(record)
        if val_map > best["val_map"]:
            best = {"val_map": val_map, "epoch": epoch}
            checkpoint = {"model": model.state_dict(), "epoch": epoch, "val_map": val_map, "config": cfg.to_dict()}
            if state.estimator is not None:
                checkpoint["estimator"] = state.estimator.state_dict()
            torch.save(checkpoint, run_dir / "bestmodel.pt")
        elif best["val_map"] - val_map > EARLY_STOP_DROP:
            print(f"early stop: val mAP {val_map:.2f} fell more than {EARLY_STOP_DROP:g} below {best['val_map']:.2f}")
            early_stopped = True
            break
    state_dict = torch.load(run_dir / "bestmodel.pt", map_location=device, weights_only=True)
    model.load_state_dict(state_dict["model"])
    test = evaluate(forward, loaders["test"], eval_labels(data.test, device), device, "test", data.class_groups, amp)
    final = {
        "best_epoch": best["epoch"],
        "val_map": best["val_map"],
        "test_map": test["map"],
        "test_ap_per_class": test["ap_per_class"],
        **({"test_group_map": test["group_map"]} if "group_map" in test else {}),
        "epochs_run": epoch,
        "early_stopped": early_stopped,
        "seconds": round(time.time() - started, 1),
    }
    (run_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    groups = "".join(f", {g} {m:.2f}" for g, m in test.get("group_map", {}).items())
    print(
        f"test mAP {test['map']:.2f}{groups} (best val mAP {best['val_map']:.2f} at epoch {best['epoch']}); {run_dir}"
    )
    return final
