"""Scoring a split: the model's sigmoid scores of every image in row order (``predict``, no host synchronisation per
batch; under torchrun each process scores its share), and mAP with the per-class APs, per-group mAP and threshold
metrics against the full labels (``evaluate``). Used for validation and test by the trainer, and by predict.py."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import datasets
import distributed
import label_rules
import loaders
import metrics


def noting_first_batch(batches, timings: dict):
    """``batches``, one by one; ``timings["first_batch_seconds"]``: how long the first took to come (host clock). The
    device waits that long for a pass to start: the pipeline's fill, paid once per pass (per 250 steps in the GPU
    check, per 4,104 on COCO), apart from the rate at which the pass then runs."""
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        if i == 0:
            timings["first_batch_seconds"] = time.perf_counter() - started
        yield batch


@torch.inference_mode()
def predict(model, loader, device, desc, amp=contextlib.nullcontext, ctx=None, timings=None) -> torch.Tensor:
    """Sigmoid scores of every image in row order, on the device, without host synchronisation per batch. Under
    torchrun each process scores its contiguous share and the shares are gathered: every image exactly once.

    The loader's batches (``bsize`` images, so that every worker delivers its first batch soon) are joined on the
    device into model batches of ``loaders.EVAL_BATCH_FACTOR`` of them: the model sees the same batches of
    ``4 x bsize`` images in row order as with one large loader batch, so the scores are the same. ``timings``: a dict
    that receives ``first_batch_seconds`` (``noting_first_batch``)."""
    ctx = ctx or distributed.SINGLE
    model.eval()
    scores, pending = [], []

    def score() -> None:
        images = torch.cat(pending) if len(pending) > 1 else pending[0]
        with amp():
            logits = model(loaders.to_model_input(images))
        scores.append(torch.sigmoid(logits.float()))
        pending.clear()

    bar = tqdm(loader, desc=desc, leave=False, file=sys.stderr, disable=not ctx.is_main)
    for images, _ in noting_first_batch(bar, {} if timings is None else timings):
        pending.append(loaders.batch_to_device(images, device))
        if len(pending) == loaders.EVAL_BATCH_FACTOR:
            score()
    if pending:
        score()
    local = torch.cat(scores) if scores else torch.zeros((0, _num_outputs(model)), device=device)
    return distributed.gather_rows(local, ctx)


def _num_outputs(model: torch.nn.Module) -> int:
    while not hasattr(model, "head"):  # unwrap FastTrainStep, DistributedDataParallel, torch.compile
        model = getattr(model, "eager", None) or getattr(model, "module", None) or model._orig_mod
    return model.head.out_features


def ap_against(scores: torch.Tensor, labels: torch.Tensor | label_rules.SparseLabels) -> torch.Tensor:
    """Per-class AP: against full labels, or, for partial labels (OpenImages), over the annotated entries only."""
    if isinstance(labels, label_rules.SparseLabels):
        rows, cols, values = (torch.from_numpy(a).to(scores.device) for a in labels.entries())
        return metrics.average_precision_entries(scores[rows, cols], values > 0, cols, labels.num_classes)
    return metrics.average_precision(scores, labels)


def threshold_metrics_against(scores: torch.Tensor, labels: torch.Tensor | label_rules.SparseLabels) -> dict:
    """CP, CR, CF1, OP, OR, OF1 at 0.5 and for the top 3 (``metrics.report_metrics``); for partial labels
    (OpenImages) over the annotated entries only."""
    if isinstance(labels, label_rules.SparseLabels):
        dense = torch.from_numpy(labels.dense(np.arange(len(labels)))).to(scores.device)
        return metrics.report_metrics(scores, dense > 0, dense != 0)
    return metrics.report_metrics(scores, labels)


def evaluate(
    model,
    loader,
    labels,
    device,
    desc="eval",
    class_groups=None,
    amp=contextlib.nullcontext,
    ctx=None,
    with_threshold_metrics: bool = False,
):
    """mAP and per-class AP in percent (NaN-free: a class without scored entries is left out and listed as None);
    with ``class_groups``, the mAP of each group (G1 the rarest) too; ``images``: how many images were scored;
    ``metrics``: the threshold metrics, when asked for; ``first_batch_seconds`` (``noting_first_batch``). Computed on
    the device."""
    timings: dict = {}
    scores = predict(model, loader, device, desc, amp, ctx, timings)
    extra = {"metrics": threshold_metrics_against(scores, labels)} if with_threshold_metrics else {}
    ap = 100.0 * ap_against(scores, labels).cpu().double()
    result = {"map": float(ap.nanmean()), "ap_per_class": [_null_if_nan(a) for a in ap.tolist()]}
    result["images"] = scores.shape[0]
    result["first_batch_seconds"] = timings.get("first_batch_seconds", 0.0)
    if class_groups is not None:
        groups = torch.from_numpy(class_groups)
        result["group_map"] = {
            f"G{g + 1}": _null_if_nan(float(ap[groups == g].nanmean())) for g in range(int(groups.max()) + 1)
        }
    return {**result, **extra}


def _null_if_nan(value: float) -> float | None:
    """NaN (no scored class) as JSON's null: final.json stays strict JSON."""
    return None if value != value else value


def eval_labels(split: datasets.Split, device: torch.device) -> torch.Tensor | label_rules.SparseLabels:
    """What a split is scored against: full labels on the device, or the sparse annotated entries."""
    if isinstance(split.labels, label_rules.SparseLabels):
        return split.labels
    return torch.from_numpy(split.labels).to(device)
