"""Tables (and plots) from run folders: methods x datasets, mean +- std over seeds at the best delta_rel by val mAP,
beside the paper's numbers, and the threshold metrics (CP, CR, CF1, OP, OR, OF1, also for the top-3) of the runs
that recorded them.

    python report.py results/table_synthetic results/sweep --out results/report

Reads every folder below the given paths that holds ``config.json`` and ``final.json``; a field missing from an older
``config.json`` counts as its current default. Each (method, dataset, training settings such as delta_rel, seed) counts
once (settings a run records but never reads, such as an AN run's delta_rel, do not count): further run folders of the
same are skipped as duplicates, folders whose files cannot be read are skipped, and both are listed. Methods, their
titles and the paper's numbers come from the method registry (``methods.py``), dataset titles from
``datasets.DATASET_INFO``. Writes ``report.md``, ``report.csv`` (and ``thresholds.csv`` when runs have threshold
metrics) and, when matplotlib is installed, PNG plots (val mAP per epoch, the memorisation curves, LL's selection
precision). Without matplotlib it writes the tables only and says so.
"""

from __future__ import annotations

import tool_io  # first: notes a Ctrl-C while torch imports (see tool_io)

# isort: split
import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import config
import datasets
import registry

# ``final.json["test_metrics"]``, in percent: at threshold 0.5, and for each image's top-3 predictions.
THRESHOLD_METRICS = (
    "CP",
    "CR",
    "CF1",
    "OP",
    "OR",
    "OF1",
    "CP_top3",
    "CR_top3",
    "CF1_top3",
    "OP_top3",
    "OR_top3",
    "OF1_top3",
)
# What a run's config needs for it to be placed in a table (the other fields have defaults).
_NEEDED = ("dataset", "seed", "train_set_variant", "mod_scheme", "loss")
_NOT_A_SETTING = config.NOT_TRAINING_SETTINGS | {"seed"}  # runs differing only in these are seeds of one setting
INTERRUPTED = "Interrupted (Ctrl-C): the files in --out may be incomplete; run the same command again."


def dataset_title(dataset: str) -> str:
    info = datasets.DATASET_INFO.get(dataset)
    return info.title if info is not None else dataset


def dataset_order(dataset: str) -> tuple:
    names = list(datasets.DATASET_INFO)
    return (names.index(dataset) if dataset in names else len(names), dataset)


def method_of(config_values: dict) -> str:
    """The table row of a run: e.g. ``LL-R``, ``wan``, ``LL-Ct+BoostLU`` (``registry.row_of``); a run of another
    label regime than the paper's single positive, or on another backbone than the dataset's own (ResNet-50 on the
    real datasets), gets a row of its own, e.g. ``LL-R [p2n1]``, ``wan [prop0.3]``, ``LL-R [timm:convnext_base]``,
    which no paper number is compared with: rows of different backbones never share a cell."""
    tags = [config.regime_name(config_values).lstrip("_")]
    info = datasets.DATASET_INFO.get(config_values["dataset"])
    arch = config_values.get("arch")
    if arch is not None and (info is None or arch != info.defaults.get("arch")):
        tags.append(str(arch))
    return registry.row_of(config_values) + "".join(f" [{tag}]" for tag in tags if tag)


def _read_object(path: Path) -> tuple[dict | None, str | None]:
    """A JSON object from ``path``, or why it cannot be read."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{path.name} cannot be read ({getattr(err, 'strerror', None) or err})"
    if not text.strip():
        return None, f"{path.name} is empty"
    try:
        value = json.loads(text)
    except ValueError:
        return None, f"{path.name} is not valid JSON"
    if not isinstance(value, dict):
        return None, f"{path.name} does not hold a JSON object"
    return value, None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_log(path: Path) -> list[dict]:
    """log.jsonl's records; lines that are not JSON objects (a line cut by a crash) are left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def load_runs(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """The finished runs below ``paths`` (each folder once), and a line per folder skipped because a file is missing
    or unreadable. A config field missing from an older ``config.json`` is read as the ``Config`` field's default."""
    defaults = config.config_defaults()
    runs, skipped, seen = [], [], set()
    for path in paths:
        for final_path in sorted(Path(path).rglob("final.json")):
            folder = final_path.parent
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            if not (folder / "config.json").exists():
                skipped.append(f"{folder}: final.json but no config.json")
                continue
            saved, problem = _read_object(folder / "config.json")
            final, final_problem = _read_object(final_path)
            problem = problem or final_problem
            if problem is None:
                lacking = [k for k in _NEEDED if k not in saved and k not in defaults]
                lacking += [k for k in ("val_map", "test_map") if not _is_number(final.get(k))]
                if lacking:
                    problem = f"no usable {', '.join(lacking)} in config.json / final.json"
                elif typed := config.type_problems(saved):  # hand-edited: the rows and groups compare these values
                    problem = f"config.json is not a valid config ({'; '.join(typed)})"
            if problem is not None:
                skipped.append(f"{folder}: {problem}")
                continue
            values = {**defaults, **saved}
            runs.append({"folder": folder, "config": values, "final": final, "log": _read_log(folder / "log.jsonl")})
    return runs, skipped


def _setting(values: dict) -> str:
    """The training settings of a run, as a key: without the seed and what does not change training, and without the
    settings it records but never reads (an older AN run's delta_rel 0.5 trained as its delta_rel 0)."""
    try:
        left_out = _NOT_A_SETTING | set(config.ignored_settings(values))
    except registry.MethodError:  # a method not registered here (a researcher's own, say): all its settings count
        left_out = _NOT_A_SETTING
    return json.dumps({k: v for k, v in values.items() if k not in left_out}, sort_keys=True, default=str)


def drop_duplicates(runs: list[dict]) -> tuple[list[dict], dict[Path, list[Path]]]:
    """One run per (training settings, seed): the first folder in path order; the others, by the folder kept."""
    kept: dict[tuple, dict] = {}
    duplicates: dict[Path, list[Path]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: str(r["folder"])):
        key = (_setting(run["config"]), json.dumps(run["config"]["seed"]))
        if key in kept:
            duplicates[kept[key]["folder"]].append(run["folder"])
        else:
            kept[key] = run
    return list(kept.values()), dict(duplicates)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _thresholds(members: list[dict]) -> tuple[dict[str, tuple[float, float]], int]:
    """Mean and std over the runs that recorded ``test_metrics`` (the others are left out), and how many did."""
    recorded = [r["final"]["test_metrics"] for r in members if isinstance(r["final"].get("test_metrics"), dict)]
    out = {}
    for name in THRESHOLD_METRICS:
        values = [m[name] for m in recorded if _is_number(m.get(name))]
        if values:
            out[name] = _mean_std(values)
    return out, len(recorded)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (train mode, dataset, method): among its settings (delta_rel, or anything else that differs), the
    one with the best mean val mAP over its seeds, and that setting's test mAP (and threshold metrics)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        c = run["config"]
        groups[(c["train_mode"], c["dataset"], method_of(c), _setting(c))].append(run)
    best: dict[tuple, dict] = {}
    compared: dict[tuple, list[dict]] = defaultdict(list)
    for (mode, dataset, method, setting), members in sorted(groups.items(), key=lambda item: item[0]):
        parsed = json.loads(setting)
        compared[(mode, dataset, method)].append(parsed)
        first = members[0]["config"]
        delta = first.get("delta_rel") if first["mod_scheme"] != registry.PLAIN_SCHEME else None
        val_mean, _ = _mean_std([r["final"]["val_map"] for r in members])
        key = (mode, dataset, method)
        if key not in best or val_mean > best[key]["val_mean"]:
            test_mean, test_std = _mean_std([r["final"]["test_map"] for r in members])
            paper = registry.paper_number(method, mode, dataset)
            thresholds, with_thresholds = _thresholds(members)
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
                "thresholds": thresholds,
                "thresholds_n": with_thresholds,
                "runs": members,
                "setting": parsed,
            }
    for key, row in best.items():
        row["settings"], row["differs"] = len(compared[key]), _differences(compared[key])
        row["chosen"] = {name: row["setting"].get(name) for name in row["differs"]}
    return sorted(
        best.values(), key=lambda r: (r["train_mode"], dataset_order(r["dataset"]), registry.row_order(r["method"]))
    )


def _differences(settings: list[dict]) -> dict[str, list]:
    """The fields in which the compared settings differ, with their values in sorted order (None: not recorded)."""
    out = {}
    for name in sorted({k for s in settings for k in s}):
        values = {json.dumps(s.get(name), sort_keys=True): s.get(name) for s in settings}
        if len(values) > 1:
            out[name] = sorted(values.values(), key=_order)
    return out


def _order(value) -> tuple:
    """Numbers by value, then other values by their text, then None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value is None, not number, value if number else str(value))


def _value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _mode_title(mode: str) -> str:
    entry = registry.REGISTRY.get(mode)
    return entry.title if entry is not None and entry.kind == registry.MODE and entry.title else mode


def markdown(rows: list[dict]) -> str:
    out = []
    for mode in sorted({r["train_mode"] for r in rows}):
        mode_rows = [r for r in rows if r["train_mode"] == mode]
        names = sorted({r["dataset"] for r in mode_rows}, key=dataset_order)
        row_keys = sorted({r["method"] for r in mode_rows}, key=registry.row_order)
        out.append(f"### {_mode_title(mode)}\n")
        out.append(
            "Test mAP, mean +- std over seeds, at the delta_rel with the best mean val mAP; in brackets the "
            "paper's number and the difference.\n"
        )
        out.append("| Method | " + " | ".join(dataset_title(d) for d in names) + " |")
        out.append("|---|" + "---|" * len(names))
        for method in row_keys:
            cells = []
            for d in names:
                row = next((r for r in mode_rows if r["dataset"] == d and r["method"] == method), None)
                cells.append(_cell(row))
            out.append(f"| {registry.row_title(method)} | " + " | ".join(cells) + " |")
        out.append("")
        chosen = [r for r in mode_rows if r["settings"] > 1]
        if chosen:  # say what competed, so that a row chosen for another lr (say) is not taken for the preset's
            out.append("Chosen by the best mean val mAP among settings that differ:\n")
            for r in sorted(chosen, key=lambda r: (dataset_order(r["dataset"]), registry.row_order(r["method"]))):
                differs = "; ".join(f"{name} {', '.join(map(_value_text, vs))}" for name, vs in r["differs"].items())
                picked = ", ".join(f"{name} {_value_text(value)}" for name, value in r["chosen"].items())
                where = f"{registry.row_title(r['method'])}, {dataset_title(r['dataset'])}"
                out.append(f"- {where}: {r['settings']} settings ({differs}); chosen: {picked}")
            out.append("")
        for d in names:
            with_metrics = [r for r in mode_rows if r["dataset"] == d and r["thresholds"]]
            if not with_metrics:
                continue
            out.append(f"#### Threshold metrics, {dataset_title(d)}\n")
            out.append(
                "Test set, in percent, mean +- std over the seeds that recorded them (n): C = per class, "
                "averaged over classes; O = over all entries; at threshold 0.5, and for each image's top 3."
                "\n"
            )
            out.append("| Method | " + " | ".join(THRESHOLD_METRICS) + " | n |")
            out.append("|---|" + "---|" * (len(THRESHOLD_METRICS) + 1))
            for row in sorted(with_metrics, key=lambda r: registry.row_order(r["method"])):
                cells = [_mean_std_text(row["thresholds"].get(m)) for m in THRESHOLD_METRICS]
                out.append(
                    f"| {registry.row_title(row['method'])} | " + " | ".join(cells) + f" | {row['thresholds_n']} |"
                )
            out.append("")
    return "\n".join(out)


def _mean_std_text(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.1f} +- {value[1]:.1f}"


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
    fields = (
        "train_mode",
        "dataset",
        "method",
        "delta_rel",
        "seeds",
        "val_mean",
        "test_mean",
        "test_std",
        "paper",
        "difference",
        "settings",
        "chosen",
    )
    with open(path, "w", newline="", encoding="utf-8", errors=tool_io.FILE_NAME_ERRORS) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            line = {k: row[k] for k in fields}
            line["seeds"] = " ".join(map(str, row["seeds"]))
            line["chosen"] = " ".join(f"{name}={_value_text(value)}" for name, value in row["chosen"].items())
            writer.writerow(line)


def write_thresholds_csv(rows: list[dict], path: Path) -> bool:
    """The threshold metrics per row (mean and std); False (nothing written) when no run recorded them."""
    rows = [r for r in rows if r["thresholds"]]
    if not rows:
        return False
    fields = ["train_mode", "dataset", "method", "n"]
    fields += [f"{m}_{part}" for m in THRESHOLD_METRICS for part in ("mean", "std")]
    with open(path, "w", newline="", encoding="utf-8", errors=tool_io.FILE_NAME_ERRORS) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            line = {
                "train_mode": row["train_mode"],
                "dataset": row["dataset"],
                "method": row["method"],
                "n": row["thresholds_n"],
            }
            for m in THRESHOLD_METRICS:
                mean, std = row["thresholds"].get(m, (None, None))
                line[f"{m}_mean"], line[f"{m}_std"] = mean, std
            writer.writerow(line)
    return True


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
            axes[0].plot(epochs, values, marker=".", label=registry.row_title(row["method"]))
            if row["method"] in ("AN", "LL-R"):
                for key, style in (("fn_prob", "-"), ("tn_prob", "--")):
                    epochs, values = _epoch_mean(row["runs"], key)
                    label = f"{registry.row_title(row['method'])} {key[:2].upper()}"
                    axes[1].plot(epochs, values, style, label=label)
            epochs, values = _epoch_mean(row["runs"], "selected_precision")
            if values:
                axes[2].plot(epochs, values, marker=".", label=registry.row_title(row["method"]))
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


def _say_skipped(skipped: list[str], duplicates: dict[Path, list[Path]]) -> None:
    for line in skipped:
        print(f"skipped {line}")
    for kept, others in sorted(duplicates.items()):
        print(
            f"skipped as duplicates of {kept} (same method, dataset, settings and seed): {', '.join(map(str, others))}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="folders to search for run folders")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="where the report goes")
    args = parser.parse_args(argv)
    try:  # never into a run folder, or over one of its files
        tool_io.refuse_overwrite(args.out, "--out")
    except tool_io.OverwriteRefused as err:
        print(f"error: {err}")
        return 1
    runs, skipped = load_runs(args.paths)
    runs, duplicates = drop_duplicates(runs)
    _say_skipped(skipped, duplicates)
    if not runs:
        print(
            f"error: no finished run (a folder with config.json and final.json) under {', '.join(map(str, args.paths))}"
        )
        return 1
    rows = summarize(runs)
    table = markdown(rows)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_bytes(tool_io.encode_text(table + "\n"))
        write_csv(rows, args.out / "report.csv")
        thresholds = write_thresholds_csv(rows, args.out / "thresholds.csv")
    except OSError as err:
        print(f"error: cannot write the report to --out {args.out} ({err.strerror or err}): choose another --out")
        return 1
    print(table)
    written = [args.out / "report.md", args.out / "report.csv"] + ([args.out / "thresholds.csv"] if thresholds else [])
    try:
        plotted = plots(rows, args.out)
        print(f"wrote {', '.join(map(str, written))} and {len(plotted)} plots")
    except ImportError:
        print(
            f"wrote {', '.join(map(str, written))}; matplotlib is not installed, so no plots "
            "(pip install matplotlib for them)"
        )
    return 0


if __name__ == "__main__":
    tool_io.run(main, interrupted=INTERRUPTED)
