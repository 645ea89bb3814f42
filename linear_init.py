"""LinearInit (Cole et al.'s training mode): train the head on frozen, cached backbone features, then fine-tune end
to end. The features are computed once per backbone weights, image size and image list, and kept with the dataset's
derived files."""

from __future__ import annotations

import copy
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
import distributed
import files
import loaders
import models
import registry
import trainstep
from label_state import LabelState

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


def train_linear_head(
    cfg, model, state: LabelState, train_feats, val_feats, val_labels, evaluate_scores, log, after_epoch=None
) -> dict:
    """Phase 1 of LinearInit: ``cfg.linear_epochs`` epochs of the head alone (and the methods' trained state, ROLE's
    estimator) on cached features, with the configured loss and no LL modification. The best-val head (and state) is
    loaded for phase 2. ``evaluate_scores(scores, val_labels)`` gives the val mAP; the callback ``after_epoch()`` runs
    after each epoch (the trainer stops there on a SIGINT)."""
    learnt = [m for m in registry.active(cfg) if m.parameters is not None]
    groups = [
        {"params": list(model.head.parameters()), "lr": cfg.lr * cfg.lr_mult},
        *registry.extra_param_groups(cfg, state),
    ]
    optimizer = trainstep.make_optimizer(cfg, groups)
    batches = loaders.EpochBatches(len(train_feats), cfg.bsize, shuffle=True, seed=cfg.seed + 1)
    best = {"val_map": -1.0, "epoch": 0}
    best_states: tuple = ()
    for epoch in range(1, cfg.linear_epochs + 1):
        batches.set_epoch(epoch)
        total = 0.0
        for batch in batches:
            idx = torch.tensor(batch, device=train_feats.device)
            loss, _ = registry.compute_loss(
                cfg, model.head(train_feats[idx]), state.observed.batch(idx), idx, 0.0, state
            )
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
