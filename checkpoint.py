"""The run folder and exact resume: config check, atomic checkpoints, and the atomic writes every cache uses.

A run folder holds ``config.json`` (written at start), ``log.jsonl`` (a line per epoch), ``checkpoint.pt`` (after
every epoch) and ``checkpoint_prev.pt`` (the one before), ``bestmodel.pt`` and, at the end, ``final.json``. Running
the same command (the same ``--exp_name``) again resumes an unfinished run from its last checkpoint and does nothing
for a finished one; a folder with a different config is refused. Every file is written atomically (temporary file,
flush, fsync, rename), so a crash or a full disk never leaves a half-written file in place of a good one, and every
load uses ``weights_only=True``.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import NOT_TRAINING_SETTINGS


class RunFolderError(Exception):
    """The run folder cannot be used as asked; the message says why and what to do."""


@dataclass
class RunFolder:
    path: Path
    finished: dict | None = None  # final.json of a finished run
    resume_from: dict | None = None  # the checkpoint to resume from, if any

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"


def _config_differences(saved: dict, current: dict) -> list[str]:
    keys = (set(saved) | set(current)) - NOT_TRAINING_SETTINGS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def open_run_folder(cfg, *, resume: bool) -> RunFolder:
    """Create the run folder, or reopen an unfinished run of the same config (``--resume`` requires one)."""
    path = cfg.run_dir
    config_path = path / "config.json"
    if not path.exists() or not any(path.iterdir()):
        if resume:
            raise RunFolderError(f"--resume: there is no run to resume in {path}. Drop --resume to start it.")
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_path, cfg.to_json() + "\n")
        return RunFolder(path)
    if not config_path.exists():
        raise RunFolderError(
            f"The run folder {path} already exists and holds files of something else; nothing was overwritten. "
            "Choose another --exp_name (or --save_path), or move that folder away."
        )
    differences = _config_differences(json.loads(config_path.read_text()), cfg.to_dict())
    if differences:
        raise RunFolderError(
            f"The run folder {path} holds a run with a different config ({', '.join(differences)} differ); nothing "
            "was overwritten. Use the same flags to resume it, or another --exp_name for a new run."
        )
    if (path / "final.json").exists():
        return RunFolder(path, finished=json.loads((path / "final.json").read_text()))
    saved = load_checkpoint(path)
    if resume and saved is None:
        raise RunFolderError(f"--resume: {path} holds no readable checkpoint yet. Drop --resume to start the run over.")
    return RunFolder(path, resume_from=saved)


def load_checkpoint(folder: Path) -> dict | None:
    """The latest readable checkpoint: ``checkpoint.pt``, or ``checkpoint_prev.pt`` if that one is damaged."""
    for name in ("checkpoint.pt", "checkpoint_prev.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or corrupt: any unpickling or zip error
            print(f"warning: {path} cannot be read ({type(err).__name__}: {err}); trying the previous checkpoint")
    return None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        raise OSError(err.errno, f"could not write {path}: {reason}") from err
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    _write_atomic(path, lambda f: np.save(f, array))


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text.encode()))


def save_torch_atomic(obj, path: Path) -> None:
    _write_atomic(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict, folder: Path) -> None:
    """Write ``checkpoint.pt``, keeping the previous one as ``checkpoint_prev.pt``. If writing fails (full disk), the
    checkpoints already there stay untouched."""
    path = folder / "checkpoint.pt"
    tmp = folder / "checkpoint.pt.new"
    _write_atomic(tmp, lambda f: torch.save(state, f))
    if path.exists():
        os.replace(path, folder / "checkpoint_prev.pt")
    os.replace(tmp, path)


def truncate_log(path: Path, lines: int) -> None:
    """Keep the first ``lines`` lines of ``log.jsonl``: the epochs the checkpoint holds (a later line belongs to an
    epoch that will run again)."""
    if path.exists():
        kept = path.read_text().splitlines(keepends=True)[:lines]
        write_text_atomic(path, "".join(kept))
