"""Peak memory of formatting and loading an OpenImages-sized label set, and the cost of densifying batches.

    python bench/openimages_memory.py [--images 3400000] [--per_image 5] [--root /tmp/oi_bench]

Writes a raw 2017_11 tree of that size (5,000 trainable classes; per training image ``per_image`` human annotations
on average, 60 % positive, classes drawn from a Zipf-like law; validation and test 10x smaller), then, each in a fresh
subprocess so the peaks do not mix: (1) ``datasets.format_dataset("openimages", root)``; (2) loading the formatted
files, the training label store and the class groups, as ``main.py`` does, and densifying 200 random batches.
Prints one JSON line with the peak resident memory of each step.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_csv(path: Path, num_images: int, per_image: float, mids: list[str], rng: np.random.Generator) -> int:
    counts = rng.poisson(per_image - 1, num_images) + 1  # at least one annotation per image
    ids = np.unique(rng.integers(0, 2**63 - 1, size=num_images, dtype=np.int64).astype(np.uint64))  # ~no collisions
    num_images = len(ids)
    counts = counts[:num_images]
    weights = 1.0 / np.arange(1, len(mids) + 1) ** 0.8
    weights /= weights.sum()
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(path, "w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        for start in range(0, num_images, 200_000):
            chunk_counts = counts[start : start + 200_000]
            image_ids = np.repeat(ids[start : start + 200_000], chunk_counts)
            classes = rng.choice(len(mids), size=len(image_ids), p=weights)
            confidence = (rng.random(len(image_ids)) < 0.6).astype(int)
            f.write(
                "".join(
                    f"{i:016x},verification,{mids[c]},{v}\n"
                    for i, c, v in zip(image_ids, classes, confidence, strict=True)
                )
            )
            total += len(image_ids)
    return total


def child(step: str, root: str) -> None:
    import torch

    import datasets
    import label_state

    start = time.time()
    out = {}
    if step == "format":
        datasets.format_dataset("openimages", root)
    elif step == "load":
        import config

        datasets.check_images_exist = lambda splits: None  # the bench tree has labels only, no image files
        cfg = config.parse_config(["--dataset", "openimages", "--data_root", root, "--exp_name", "bench"])
        data = datasets.build_data(cfg)  # exactly what main.py does before training
        train = data.train.observed
        store = label_state.label_store(train, torch.device("cpu"))
        out["train_rows"], out["train_entries"] = len(train), int(train.indptr[-1])
        out["val_rows"], out["test_rows"], out["groups"] = (
            len(data.val),
            len(data.test),
            int(data.class_groups.max()) + 1,
        )
        rng = np.random.default_rng(0)
        for bsize in (16, 288):
            batches = [torch.from_numpy(rng.choice(len(train), bsize, replace=False)) for _ in range(200)]
            t = time.perf_counter()
            for idx in batches:
                store.batch(idx)
            out[f"densify_ms_per_batch_{bsize}"] = round((time.perf_counter() - t) / len(batches) * 1000, 3)
    out["seconds"] = round(time.time() - start, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3_400_000)
    parser.add_argument("--per_image", type=float, default=5.0)
    parser.add_argument("--root", default="/tmp/oi_bench")
    parser.add_argument("--child", choices=("baseline", "format", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.root)
    root = Path(args.root)
    base = root / "2017_11"
    rng = np.random.default_rng(0)
    mids = [f"/m/{i:05x}" for i in range(5000)]
    result = {"images": args.images, "per_image": args.per_image}
    if not (base / "train" / "annotations-human.csv").exists():
        base.mkdir(parents=True, exist_ok=True)
        (base / "classes-trainable.txt").write_text("\n".join(mids) + "\n")
        t = time.time()
        result["train_annotations"] = write_csv(
            base / "train" / "annotations-human.csv", args.images, args.per_image, mids, rng
        )
        for folder in ("validation", "test"):
            write_csv(base / folder / "annotations-human.csv", args.images // 10, args.per_image * 2, mids, rng)
        result["generate_seconds"] = round(time.time() - t, 1)
    for step in ("baseline", "format", "load"):  # baseline: the imports alone (torch's CUDA build is ~0.5 GB)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", step, "--root", str(root)], capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(f"{step} failed:\n{proc.stderr[-3000:]}")
        result[step] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
