"""mAP speed: metrics.average_precision against scikit-learn called once per class, same data, same process.

    python bench/metrics_speed.py [--rows 20000] [--classes 1000] [--repeats 3]

Prints JSON with both timings (best of --repeats), their ratio and the largest difference between the two results.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    # float32 scores rounded to 3 decimals (many ties, as sigmoid outputs have), 3% positives, some empty classes
    scores = np.round(rng.random((args.rows, args.classes)), 3).astype(np.float32)
    targets = rng.random((args.rows, args.classes)) < 0.03
    targets[:, :5] = False

    def reference():
        pairs = zip(targets.T, scores.T, strict=True)
        return np.array([average_precision_score(t, s) if t.any() else 0.0 for t, s in pairs])

    t_ref, ap_ref = best_time(reference, args.repeats)
    t_ours, ap_ours = best_time(lambda: metrics.average_precision(scores, targets), args.repeats)
    print(
        json.dumps(
            {
                "shape": [args.rows, args.classes],
                "sklearn_per_class_s": round(t_ref, 4),
                "metrics_average_precision_s": round(t_ours, 4),
                "speedup": round(t_ref / t_ours, 2),
                "max_abs_difference": float(np.abs(ap_ref - ap_ours).max()),
            }
        )
    )


if __name__ == "__main__":
    main()
