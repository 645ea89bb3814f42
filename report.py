"""Tables (and plots) from run folders: methods x datasets, mean +- std over seeds at the best delta_rel by val mAP,
beside the paper's numbers.

    python report.py results/table_synthetic results/sweep --out results/report

Reads every folder below the given paths that holds ``config.json`` and ``final.json``. Writes ``report.md`` and
``report.csv`` and, when matplotlib is installed, PNG plots (val mAP per epoch, the memorisation curves, LL's
selection precision). Without matplotlib it writes the tables only and says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from config import NOT_TRAINING_SETTINGS

DATASET_COLUMNS = ("pascal", "coco", "nuswide", "cub", "openimages", "synthetic")
DATASET_TITLES = {"pascal": "VOC12", "coco": "COCO14", "nuswide": "NUS-WIDE", "cub": "CUB", "openimages": "OpenImages"}
METHOD_ORDER = ("full", "AN", "wan", "lsan", "epr", "role", "em", "em_apl", "LL-R", "LL-Ct", "LL-Cp")
METHOD_TITLES = {"full": "Full label", "AN": "Naive AN", "wan": "WAN", "lsan": "LSAN", "epr": "EPR", "role": "ROLE",
                 "em": "EM", "em_apl": "EM+APL"}  # fmt: skip

# The paper's numbers (PAPER_FACTS section 1), by train mode, method, dataset.
_E2E = {
    "full": (90.2, 78.0, 54.5, 32.9), "AN": (85.1, 64.1, 42.0, 19.1), "wan": (86.5, 64.8, 46.3, 20.3),
    "lsan": (86.7, 66.9, 44.9, 17.9), "epr": (85.5, 63.3, 46.0, 20.0), "role": (87.9, 66.3, 43.1, 15.0),
    "LL-R": (89.2, 71.0, 47.4, 19.5), "LL-Ct": (89.0, 70.5, 48.0, 20.4), "LL-Cp": (88.4, 70.7, 48.3, 20.1),
    "em_apl": (89.19, 70.87, 47.59, 21.84),  # as reported in the BoostLU paper
    "LL-R+BoostLU": (89.29, 72.89, 49.59, 19.80), "LL-Ct+BoostLU": (88.61, 71.78, 48.37, 19.25),
    "LL-Cp+BoostLU": (87.81, 71.41, 48.61, 19.34),
}  # fmt: skip
_LINEAR_INIT = {
    "full": (91.1, 77.2, 54.9, 34.0), "AN": (86.9, 68.7, 47.6, 20.9), "wan": (87.1, 68.0, 47.5, 21.1),
    "lsan": (86.5, 69.2, 50.5, 16.6), "epr": (84.9, 66.8, 48.1, 21.2), "role": (88.2, 69.0, 51.0, 16.8),
    "LL-R": (89.4, 71.9, 49.1, 21.5), "LL-Ct": (89.3, 71.6, 49.6, 21.8), "LL-Cp": (88.3, 71.0, 49.4, 21.4),
}  # fmt: skip
_OPENIMAGES_ALL = {"AN": 82.0, "wan": 77.0, "lsan": 75.0, "LL-R": 82.5, "LL-Ct": 82.6, "LL-Cp": 82.5}


def paper_number(train_mode: str, method: str, dataset: str) -> float | None:
    if dataset == "openimages":
        return _OPENIMAGES_ALL.get(method) if train_mode == "end_to_end" else None
    table = _E2E if train_mode == "end_to_end" else _LINEAR_INIT
    if method not in table or dataset not in DATASET_COLUMNS[:4]:
        return None
    return table[method][DATASET_COLUMNS.index(dataset)]


def method_of(config: dict) -> str:
    """The table row of a run: e.g. ``LL-R``, ``wan``, ``LL-Ct+BoostLU``."""
    if config["train_set_variant"] == "clean":
        name = "full"
    elif config.get("loss", "an") != "an":
        name = config["loss"]
    else:
        name = config["mod_scheme"]
    return name + ("+BoostLU" if config.get("boostlu_alpha", 0) > 0 else "")


def method_title(method: str) -> str:
    base, _, boost = method.partition("+")
    return METHOD_TITLES.get(base, base) + (f" + {boost}" if boost else "")


def method_sort_key(method: str) -> tuple:
    base, _, boost = method.partition("+")
    return (bool(boost), METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        for final_path in sorted(Path(path).rglob("final.json")):
            folder = final_path.parent
            config = json.loads((folder / "config.json").read_text())
            log_path = folder / "log.jsonl"
            log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
            runs.append({"folder": folder, "config": config, "final": json.loads(final_path.read_text()), "log": log})
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


_NOT_A_SETTING = NOT_TRAINING_SETTINGS | {"seed"}  # runs differing only in these are seeds of one setting


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (train mode, dataset, method): among its settings (delta_rel, or anything else that differs), the
    one with the best mean val mAP over its seeds, and that setting's test mAP."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        c = run["config"]
        setting = json.dumps({k: v for k, v in c.items() if k not in _NOT_A_SETTING}, sort_keys=True)
        groups[(c.get("train_mode", "end_to_end"), c["dataset"], method_of(c), setting)].append(run)
    best: dict[tuple, dict] = {}
    for (mode, dataset, method, _), members in groups.items():
        delta = members[0]["config"]["delta_rel"] if members[0]["config"]["mod_scheme"] != "AN" else None
        val_mean, _ = _mean_std([r["final"]["val_map"] for r in members])
        key = (mode, dataset, method)
        if key not in best or val_mean > best[key]["val_mean"]:
            test_mean, test_std = _mean_std([r["final"]["test_map"] for r in members])
            paper = paper_number(mode, method, dataset)
            best[key] = {
                "train_mode": mode,
                "dataset": dataset,
                "method": method,
                "delta_rel": delta,
                "seeds": sorted(r["config"]["seed"] for r in members),
                "val_mean": val_mean,
                "test_mean": test_mean,
                "test_std": test_std,
                "paper": paper,
                "difference": None if paper is None else test_mean - paper,
                "runs": members,
            }
    return sorted(best.values(), key=lambda r: (r["train_mode"], r["dataset"], method_sort_key(r["method"])))


def markdown(rows: list[dict]) -> str:
    out = []
    for mode in sorted({r["train_mode"] for r in rows}):
        mode_rows = [r for r in rows if r["train_mode"] == mode]
        datasets = [d for d in DATASET_COLUMNS if any(r["dataset"] == d for r in mode_rows)]
        methods = sorted({r["method"] for r in mode_rows}, key=method_sort_key)
        out.append(f"### {'End-to-end' if mode == 'end_to_end' else 'LinearInit'}\n")
        out.append("Test mAP, mean +- std over seeds, at the delta_rel with the best mean val mAP; in brackets the "
                   "paper's number and the difference.\n")  # fmt: skip
        out.append("| Method | " + " | ".join(DATASET_TITLES.get(d, d) for d in datasets) + " |")
        out.append("|---|" + "---|" * len(datasets))
        for method in methods:
            cells = []
            for d in datasets:
                row = next((r for r in mode_rows if r["dataset"] == d and r["method"] == method), None)
                cells.append(_cell(row))
            out.append(f"| {method_title(method)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    text = f"{row['test_mean']:.1f} +- {row['test_std']:.1f}"
    if row["delta_rel"] is not None:
        text += f" (d {row['delta_rel']:g})"
    text += f" [n={len(row['seeds'])}]"
    if row["paper"] is not None:
        text += f" [paper {row['paper']:g}, {row['difference']:+.1f}]"
    return text


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ("train_mode", "dataset", "method", "delta_rel", "seeds", "val_mean", "test_mean", "test_std", "paper",
              "difference")  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (" ".join(map(str, row[k])) if k == "seeds" else row[k]) for k in fields})


def _epoch_mean(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for record in run["log"]:
            if record.get("phase", "end_to_end") == "end_to_end" and record.get(key) is not None:
                by_epoch[record["epoch"]].append(record[key])
    epochs = sorted(by_epoch)
    return epochs, [statistics.mean(by_epoch[e]) for e in epochs]


def plots(rows: list[dict], out: Path) -> list[Path]:
    """PNG plots per (train mode, dataset); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for mode, dataset in sorted({(r["train_mode"], r["dataset"]) for r in rows}):
        group = [r for r in rows if (r["train_mode"], r["dataset"]) == (mode, dataset)]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax in axes:  # up to 20 distinguishable lines (14 methods in the full table)
            ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for row in group:
            epochs, values = _epoch_mean(row["runs"], "val_map")
            axes[0].plot(epochs, values, marker=".", label=method_title(row["method"]))
            if row["method"] in ("AN", "LL-R"):
                for key, style in (("fn_prob", "-"), ("tn_prob", "--")):
                    epochs, values = _epoch_mean(row["runs"], key)
                    axes[1].plot(epochs, values, style, label=f"{method_title(row['method'])} {key[:2].upper()}")
            epochs, values = _epoch_mean(row["runs"], "selected_precision")
            if values:
                axes[2].plot(epochs, values, marker=".", label=method_title(row["method"]))
        titles = ("val mAP per epoch", "mean predicted probability: false vs true negatives", "LL selection precision")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{dataset} ({mode})")
        fig.tight_layout()
        path = out / f"{mode}_{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="folders to search for run folders")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="where the report goes")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    if not runs:
        print(
            f"error: no finished run (a folder with config.json and final.json) under {', '.join(map(str, args.paths))}"
        )
        return 1
    rows = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (args.out / "report.md").write_text(table + "\n")
    write_csv(rows, args.out / "report.csv")
    print(table)
    try:
        written = plots(rows, args.out)
        print(f"wrote {args.out / 'report.md'}, {args.out / 'report.csv'} and {len(written)} plots")
    except ImportError:
        print(f"wrote {args.out / 'report.md'} and {args.out / 'report.csv'}; matplotlib is not installed, so no plots "
              "(pip install matplotlib for them)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
