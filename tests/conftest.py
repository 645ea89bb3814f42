"""Shared fixtures: the repo on sys.path, the synthetic dataset generated once per session, CLI runners (a
subprocess, and in this process)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The paper's table rows, in order, and the built-in datasets. Tests that pin them leave a researcher's own entries
# (docs/extending.md) aside, so that adding one needs no edit here.
BUILT_IN_ROWS = ("full", "AN", "wan", "lsan", "epr", "role", "em", "em_apl", "gr", "LL-R", "LL-Ct", "LL-Cp",
                 "vlpl", "aevlp",
                 "LL-R+BoostLU", "LL-Ct+BoostLU", "LL-Cp+BoostLU")  # fmt: skip
BUILT_IN_DATASETS = ("pascal", "coco", "nuswide", "cub", "openimages", "synthetic")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The default synthetic dataset and its pretrained backbone, generated once (about 15 s) for the whole session."""
    import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.ensure_dataset(root)
    synthetic.ensure_pretrained_backbone(root)
    return root


def run_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python main.py ARGS`` in a subprocess, the way users do."""
    full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_main(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``main.main(ARGS)`` in this process, stdout and stderr captured, the exit code as ``returncode``: the command
    line's own code from its argument parsing on, without a new interpreter (each start imports torch and the
    compiler stack that its optimisers load, several seconds on a 2-core machine). Signals, environment variables and
    the interpreter's own exit need ``run_cli``."""
    import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main.main(list(args))
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    proc = subprocess.CompletedProcess(["main.py", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"main.py {' '.join(args)} failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    config = json.loads((run_dir / "config.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final.json").read_text())
    return config, log, final


def drop_timings(*records: dict) -> None:
    """Remove the wall-clock entries (``seconds``, ``train_seconds``, ``test_seconds``, ...) that differ between
    otherwise identical runs."""
    for record in records:
        for key in [k for k in record if k.endswith("seconds") or k == "fast_step_warmup_s"]:
            record.pop(key)
