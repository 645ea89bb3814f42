"""Every built-in row of the table, on every built-in dataset, in both training modes, resolves to the settings it
resolved to when the per-dataset constants moved from the method entries into the dataset entries (the paper's and
the authors' published values): tests/pinned_presets.json, written once from the code before that move. A change to
any preset of a built-in method or dataset fails here; a researcher's own entries are left aside."""

import json
from pathlib import Path

import pytest
from conftest import BUILT_IN_DATASETS, BUILT_IN_ROWS

import config
import registry

PINNED = Path(__file__).with_name("pinned_presets.json")
MODES = ("end_to_end", "linear_init")


def resolved(dataset: str, row_flags: tuple[str, ...], mode: str) -> dict:
    """The preset-resolved settings of one row (every registry flag, the dataset-level presets, the scheme, which
    values came from presets), or {"refused": True} when the command line refuses it."""
    argv = ["--dataset", dataset, "--train_mode", mode, *row_flags, "--exp_name", "pin"]
    try:
        cfg = config.config_from_args(config.get_args_parser().parse_args(argv))
    except ValueError:
        return {"refused": True}
    keys = [*config.DATASET_PRESETS, "mod_scheme", *registry.flags()]
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items() if k in keys}
    return {**values, "from_preset": list(cfg.from_preset)}


def current() -> dict:
    rows = {key: flags for key, _title, flags in registry.rows() if key in BUILT_IN_ROWS}
    return {f"{d} {key} {mode}": resolved(d, flags, mode) for d in BUILT_IN_DATASETS for key, flags in rows.items()
            for mode in MODES}  # fmt: skip


def test_the_pin_covers_every_built_in_row_dataset_and_mode():
    pinned = json.loads(PINNED.read_text())
    assert len(pinned) == len(BUILT_IN_ROWS) * len(BUILT_IN_DATASETS) * len(MODES)
    assert sum("refused" not in v for v in pinned.values()) > 100


@pytest.mark.parametrize("dataset", BUILT_IN_DATASETS)
def test_resolved_presets_are_the_pinned_ones(dataset):
    pinned = {k: v for k, v in json.loads(PINNED.read_text()).items() if k.startswith(f"{dataset} ")}
    now = {k: v for k, v in current().items() if k.startswith(f"{dataset} ")}
    assert set(now) == set(pinned)
    for key, values in pinned.items():  # the pinned settings; a flag of a researcher's own method is left aside
        own = {k: v for k, v in now[key].items() if k in values}
        if "from_preset" in values:
            own["from_preset"] = [name for name in now[key]["from_preset"] if name in values]
        assert own == values, key


if __name__ == "__main__":  # writes the pin: only when a built-in value changes on purpose, with its source
    PINNED.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
