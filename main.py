"""Entry point: ``python main.py --dataset coco --mod_scheme LL-R`` (no arguments: the embedded synthetic demo).

Several GPUs or nodes: ``torchrun --nproc_per_node N main.py ...`` (the same flags; ``--bsize`` stays the global batch).
"""

import tool_io  # first: notes a Ctrl-C while torch imports (see tool_io)

# isort: split
import errno
import os
import sys

import checkpoint
import config
import datasets
import files
import models
import resize
import train
import trainstep

USER_ERRORS = (
    datasets.DataError,
    models.PretrainedWeightsUnavailable,
    train.TrainingError,
    checkpoint.RunFolderError,
    files.LockError,
    train.Interrupted,
    trainstep.GraphCaptureError,
    resize.ResizeUnavailable,
    models.ArchError,  # parse_config refuses these first; a config built in code reaches run() with them
)
INTERRUPTED = (
    "Interrupted (Ctrl-C). Every file written so far is complete (files are replaced whole, never half-written): run "
    "the same command again to continue; an unfinished run resumes from its last checkpoint."
)


def user_message(err: Exception) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back with the worker's traceback
    prepended ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep only the message."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rpartition(marker)[2]
    return text.strip()


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def os_error_message(err: OSError, cfg: config.Config) -> str:
    """A file that could not be read or written: which one, why, and the flag that chose it."""
    path = err.filename
    reason = err.strerror or str(err)
    every = "--data_root and --save_path" if cfg.cache_dir is None else "--data_root, --save_path and --cache_dir"
    if path is None:
        return f"{reason}. Check {every}."
    if _inside(path, cfg.save_path):
        flag = f"--save_path {cfg.save_path} / --exp_name ({len(cfg.exp_name)} characters)"
    elif cfg.cache_dir is not None and _inside(path, cfg.cache_dir):
        flag = f"--cache_dir {cfg.cache_dir}"
    elif _inside(path, cfg.data_root):
        flag = f"--data_root {cfg.data_root}"
    else:
        flag = every
    hints = {
        errno.ENAMETOOLONG: "the name is too long",
        errno.ENOTDIR: "a part of that path is a file, not a folder",
        errno.EEXIST: "a file is in the way of a folder",
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
    }
    hint = hints.get(err.errno)
    return f"Cannot use {path}: {reason}{f' ({hint})' if hint else ''}. Check {flag}."


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.parse_config(argv)
    except KeyboardInterrupt:
        print(f"error: {tool_io.INTERRUPTED_STARTING}", file=sys.stderr)
        return 130
    try:
        train.run(cfg)
    except USER_ERRORS as err:
        if cfg.debug:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 130 if isinstance(err, train.Interrupted) else 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (data preparation, caches), or a second one
        if cfg.debug:
            raise
        print(f"error: {INTERRUPTED}", file=sys.stderr)
        return 130
    except OSError as err:  # a file that cannot be read or written (permissions, a file in a folder's place, ...)
        tool_io.reraise_if_output_closed(err)  # `main.py | head`: ends quietly (tool_io.run)
        if cfg.debug:
            raise
        print(f"error: {os_error_message(err, cfg)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    tool_io.run(main, interrupted=INTERRUPTED)
