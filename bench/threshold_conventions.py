"""OP (and OF1) under this project's convention against ML-GCN's code, on a seeded example.

    python bench/threshold_conventions.py

This project (``metrics.threshold_metrics``): OP = TP / predicted positives, pooled over every entry. ML-GCN's code
(``AveragePrecisionMeter.evaluation``, Chen et al., CVPR 2019, copied by many later repositories) sets each class's
predicted count to 1 where it is 0 *before* pooling, so every class with no predicted positive adds 1 to OP's
denominator. Per class both give precision 0 to such a class, so CP agrees. The example: 1,000 images, 80 classes,
about 3 positives per image, a weak scorer whose rare classes seldom reach the threshold; prints both conventions at
0.5 and for the top 3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402


def mlgcn_op(predicted: np.ndarray, targets: np.ndarray) -> float:
    """ML-GCN's pooled precision, in percent, from its algorithm: per-class counts, empty counts set to 1, pooled."""
    num_predicted = predicted.sum(0).astype(float)
    true_pos = (predicted & targets).sum(0).astype(float)
    num_predicted[num_predicted == 0] = 1
    return 100.0 * true_pos.sum() / num_predicted.sum()


def main() -> None:
    rng = np.random.default_rng(0)
    n, c = 1000, 80
    frequency = np.geomspace(0.2, 0.002, c)  # a long tail, as COCO's
    targets = rng.random((n, c)) < frequency
    logits = 1.5 * targets + rng.normal(0, 1, (n, c)) - 2.0 + np.log(frequency / frequency.max())
    scores = 1 / (1 + np.exp(-logits))
    out = {}
    for name, top_k in (("at_0.5", None), ("top3", 3)):
        ours = metrics.threshold_metrics(torch.tensor(scores), torch.tensor(targets), threshold=0.5, top_k=top_k)
        predicted = scores >= 0.5
        if top_k:
            top = np.argsort(-scores, axis=1)[:, :top_k]
            in_top = np.zeros_like(predicted)
            np.put_along_axis(in_top, top, True, axis=1)
            predicted &= in_top
        out[name] = {
            "classes_without_prediction": int((predicted.sum(0) == 0).sum()),
            "OP": round(ours["OP"], 2),
            "OP_mlgcn": round(mlgcn_op(predicted, targets), 2),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
