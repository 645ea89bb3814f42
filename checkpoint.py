"""The run folder and exact resume: config check, lock, atomic checkpoints.

A run folder holds ``config.json`` (written at start), ``data.json`` (the data root and the formatted data's
fingerprint), ``log.jsonl`` (a line per epoch), ``checkpoint.pt`` (after every epoch) and ``checkpoint_prev.pt`` (the
one before), ``bestmodel.pt``, at the end ``final.json``, and ``.lock`` (held while a process works in the folder).
Running the same command (the same ``--exp_name``) again resumes an unfinished run from its last checkpoint and does
nothing for a finished one; a folder with a different config or other data is refused, and so is a second process
while the first one runs. Every file is written atomically (``files.py``) and every load uses ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import files

# Still importable from here for the modules that write their caches through checkpoint.

LOCK_NAME = ".lock"
CHECKPOINTS = ("checkpoint.pt", "checkpoint_prev.pt")


class RunFolderError(Exception):
    """The run folder cannot be used as asked; the message says why and what to do."""


@dataclass
class RunFolder:
    path: Path
    finished: dict | None = None  # final.json of a finished run
    resume_from: dict | None = None  # the checkpoint to resume from, if any
    resume_file: Path | None = None  # the file it was read from (checkpoint.pt, or checkpoint_prev.pt)
    lock: files.Lock | None = None  # held for the whole run (by the first process under torchrun)
    logged: list[str] = dataclasses.field(default_factory=list)  # the log.jsonl lines the resumed checkpoint covers
    log_note: str | None = None  # why log.jsonl is rewritten from the checkpoint on resume (missing, cut, ...)

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    def release(self) -> None:
        """Free the run folder for another process (the end of the process frees it too)."""
        if self.lock is not None:
            self.lock.release()


_MISSING = object()


def _defaults(cfg) -> dict:
    """The config fields that have a default, as JSON would hold them."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = json.loads(json.dumps(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = json.loads(json.dumps(f.default_factory()))
    return out


def _config_differences(saved: dict, current: dict, not_training: frozenset[str], defaults: dict) -> list[str]:
    """The settings that change training and differ. A key missing from one side (a config.json written before the
    field existed) counts as the field's default; a missing key without a default is a difference."""
    keys = (set(saved) | set(current)) - set(not_training)

    def value(d: dict, k: str):
        return d.get(k, defaults.get(k, _MISSING))

    return sorted(k for k in keys if value(saved, k) is _MISSING or value(saved, k) != value(current, k))


def _read_json(path: Path, what_to_do: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise RunFolderError(
            f"{path} is not valid JSON ({err}): it was damaged or edited by hand. {what_to_do}"
        ) from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} does not hold a JSON object: it was damaged or edited by hand. {what_to_do}")
    return value


def _folder_error(path: Path, cfg, err: OSError) -> RunFolderError:
    """A clear message for a run folder that cannot be created or written."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENAMETOOLONG:
        fix = f"a folder name in it is too long: shorten --save_path, or --exp_name ({len(cfg.exp_name)} characters)"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = (
            f"a part of --save_path {cfg.save_path} (or the run folder itself) is a file, not a folder: choose "
            "another --save_path or --exp_name"
        )
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"--save_path {cfg.save_path} is not writable here: choose a writable --save_path"
    elif err.errno == errno.ENOSPC:
        written = getattr(err, "path", None)
        return RunFolderError(
            f"Cannot write {written or path}: the disk is full. Nothing half-written was left in {path} (files are "
            "replaced whole): free some space and run the same command again, or choose another --save_path."
        )
    else:
        fix = "check --save_path and --exp_name"
    return RunFolderError(f"Cannot create or write the run folder {path} ({reason}): {fix}.")


def open_run_folder(
    cfg,
    *,
    resume: bool,
    not_training: frozenset[str],
    lock: bool,
    data_fingerprint: str | None = None,
) -> RunFolder:
    """Create the run folder, or reopen an unfinished run of the same config and data (``--resume`` requires one).

    ``not_training``: the config keys that do not change what is trained (``config.NOT_TRAINING_SETTINGS``).
    ``data_fingerprint``: a digest of the formatted data, kept in ``data.json`` and compared on resume. ``lock``: take
    the run folder's lock and keep it in the returned ``RunFolder`` (``release()`` frees it); False for the other
    processes of a torchrun run, whose first process holds it and writes the files.
    """
    path = cfg.run_dir
    if resume and not (path.is_dir() and _contents(path)):
        raise RunFolderError(f"--resume: there is no run to resume in {path}. Drop --resume to start it.")
    held = None
    try:
        if lock:
            path.mkdir(parents=True, exist_ok=True)
            held = files.acquire_lock(path / LOCK_NAME, f"The run folder {path}")
        folder = _open_locked(cfg, path, resume, frozenset(not_training), data_fingerprint, writer=lock)
    except OSError as err:
        if held is not None:
            held.release()
        raise _folder_error(path, cfg, err) from None
    except BaseException:
        if held is not None:
            held.release()
        raise
    folder.lock = held
    return folder


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK_NAME]


# What a run writes into its folder before it trains: a folder holding only these (its lock free: no process works in
# it) is a run that stopped during its setup (weights unavailable, a bad image, ...), with nothing to lose or resume.
STARTED_ONLY = frozenset({"config.json", "data.json"})
# The temporary files of those two writes (files.write_atomic), which a process killed mid-write leaves behind.
LEFT_BY_A_FAILED_WRITE = frozenset({"config.json.tmp", "data.json.tmp"})


def _open_locked(cfg, path: Path, resume: bool, not_training, fingerprint, writer: bool) -> RunFolder:
    config_path = path / "config.json"
    contents = {p.name for p in _contents(path)} - LEFT_BY_A_FAILED_WRITE
    ours = _a_run_config(config_path) or (contents == {"data.json"} and _a_data_record(path / "data.json"))
    if contents <= STARTED_ONLY and (not contents or resume or (writer and ours)):
        if resume:
            why = " (its run stopped before it trained)" if contents else ""
            raise RunFolderError(f"--resume: there is no run to resume in {path}{why}. Drop --resume to start it.")
        if contents:
            print(
                f"The run folder {path} holds a run that stopped before it trained (its config only); it starts "
                "afresh with these flags.",
                flush=True,
            )
        if writer:  # config.json first: a folder holding it is recognised as this tool's on the next try
            files.write_text_atomic(config_path, cfg.to_json() + "\n")
            _write_data_json(path, cfg, fingerprint)
        return RunFolder(path)
    if not config_path.exists():
        raise RunFolderError(
            f"The run folder {path} already exists and holds files of something else; nothing was overwritten. "
            "Choose another --exp_name (or --save_path), or move that folder away."
        )
    elsewhere = "Restore it, or move the run folder away (or use another --exp_name) to start a new run."
    defaults = _defaults(cfg)
    differences = _config_differences(_read_json(config_path, elsewhere), cfg.to_dict(), not_training, defaults)
    if differences:
        raise RunFolderError(
            f"The run folder {path} holds a run with a different config ({', '.join(differences)} differ); nothing "
            "was overwritten. Use the same flags to resume it, or another --exp_name for a new run."
        )
    if (path / "final.json").exists():
        finished = _read_json(
            path / "final.json",
            "Delete final.json and run the same command again: the best weights are scored on test again.",
        )
        return RunFolder(path, finished=finished)
    _check_data(path, cfg, fingerprint, writer)
    saved, used = _usable_checkpoint(path, cfg, not_training, defaults, writer)
    if resume and saved is None:
        raise RunFolderError(f"--resume: {path} holds no readable checkpoint yet. Drop --resume to start the run over.")
    logged, note = _logged_lines(path, saved) if saved is not None else ([], None)
    if saved is not None:
        best_epoch = saved.get("progress", {}).get("best_epoch", 0)
        if best_epoch and not (path / "bestmodel.pt").exists():
            raise RunFolderError(
                f"{path / 'bestmodel.pt'} is missing: the checkpoint says the best weights so far are those of epoch "
                f"{best_epoch}, and the test is scored with them at the end. It was deleted or moved: put it back and "
                "run the same command again to resume, or move the run folder away (or use another --exp_name) to "
                "start over."
            )
        if best_epoch and writer:  # read now, not after the remaining epochs, when the test needs it
            load_best_model(path / "bestmodel.pt", best_epoch)
    return RunFolder(path, resume_from=saved, resume_file=used, logged=logged, log_note=note)


def _a_run_config(path: Path) -> bool:
    """``path`` holds a config a run wrote (a JSON object with a dataset); a damaged one is reported, not replaced."""
    try:
        return "dataset" in _read_json(path, "")
    except (OSError, RunFolderError):
        return False


def _a_data_record(path: Path) -> bool:
    """``path`` is a data.json this tool wrote (a version that wrote it before config.json left it alone when the
    disk filled up while writing config.json)."""
    try:
        return {"data_root", "fingerprint"} <= set(_read_json(path, ""))
    except (OSError, RunFolderError):
        return False


def _write_data_json(path: Path, cfg, fingerprint: str | None) -> None:
    record = {"data_root": os.path.realpath(cfg.data_root), "fingerprint": fingerprint}
    files.write_text_atomic(path / "data.json", json.dumps(record, indent=2) + "\n")


def _check_data(path: Path, cfg, fingerprint: str | None, writer: bool) -> None:
    """Refuse to resume on other data: another --data_root (unless the same formatted files moved there) or formatted
    files with another fingerprint. A run folder from before data.json existed is checked on its data root only."""
    data_path = path / "data.json"
    what_to_do = "Delete data.json to resume without this check, or use another --exp_name for a new run."
    current_root = os.path.realpath(cfg.data_root)
    if data_path.exists():
        saved = _read_json(data_path, what_to_do)
        saved_root, saved_fingerprint = saved.get("data_root"), saved.get("fingerprint")
    else:
        saved_root = json.loads((path / "config.json").read_text()).get("data_root")
        saved_fingerprint = None
        if saved_root is not None and saved_root == cfg.data_root:
            saved_root = current_root
        elif saved_root is not None:
            saved_root = os.path.realpath(saved_root)
    same_files = saved_fingerprint is not None and fingerprint is not None and saved_fingerprint == fingerprint
    if saved_fingerprint is not None and fingerprint is not None and not same_files:
        raise RunFolderError(
            f"The run in {path} was trained on other formatted data than {cfg.data_root} holds now (fingerprint "
            f"{saved_fingerprint[:12]} then, {fingerprint[:12]} now): resuming would mix two datasets. Restore the "
            "formatted files it was trained on, or use another --exp_name for a new run."
        )
    if saved_root is not None and saved_root != current_root and not same_files:
        raise RunFolderError(
            f"The run in {path} was trained on the data in {saved_root}, not --data_root {cfg.data_root}: resuming "
            f"would mix two datasets. Resume with --data_root {saved_root}, or use another --exp_name for a new run."
        )
    if saved_root is not None and saved_root != current_root and writer:
        print(f"note: the data of {path} moved from {saved_root} to {current_root} (the same formatted files)")
    if writer and (saved_root != current_root or saved_fingerprint is None or not data_path.exists()):
        _write_data_json(path, cfg, fingerprint if fingerprint is not None else saved_fingerprint)


def _usable_checkpoint(path: Path, cfg, not_training, defaults: dict, writer: bool) -> tuple[dict | None, Path | None]:
    """The latest checkpoint that can be read and was written with this config: ``checkpoint.pt``, else
    ``checkpoint_prev.pt`` (with a warning that says why ``checkpoint.pt`` was skipped). None when the run has no
    checkpoint yet; a RunFolderError when checkpoints exist but none can be used (never a silent restart)."""
    current = cfg.to_dict()
    skipped: list[str] = []
    other_config: list[str] = []
    for name in CHECKPOINTS:
        file = path / name
        if not file.exists():
            continue
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or not {"progress", "model", "optimizer"} <= set(payload):
                raise ValueError("it does not hold a training checkpoint")
        except PermissionError as err:  # not damaged: this user may not read it
            raise RunFolderError(permission_message(file, err, "resume the run")) from None
        except Exception as err:  # truncated or corrupt: any unpickling or zip error
            skipped.append(f"{name} cannot be read ({type(err).__name__}: {str(err).strip()[:300]})")
            continue
        saved = payload.get("config")
        differences = _config_differences(saved, current, not_training, defaults) if isinstance(saved, dict) else []
        if differences:
            details = ", ".join(
                f"{k} {saved.get(k, defaults.get(k))!r} there, {current.get(k)!r} here" for k in differences
            )
            skipped.append(f"{name} was written with another config ({details})")
            other_config.append(details)
            continue
        if skipped and writer:
            print(f"warning: in {path}, {'; '.join(skipped)}: resuming from {name} instead")
        return payload, file
    if not skipped:
        return None, None
    if len(other_config) == len(skipped):  # every checkpoint disagrees with config.json: it was edited
        raise RunFolderError(
            f"The checkpoints in {path} were written with another config than its config.json and the flags given "
            f"({'; '.join(dict.fromkeys(other_config))}): config.json was edited after the run started, and resuming "
            "would mix the two. Resume with the checkpoint's values (in config.json and the flags), or use another "
            "--exp_name for a new run."
        )
    raise RunFolderError(
        f"No checkpoint in {path} can be used: {'; '.join(skipped)}. Nothing was overwritten. To start the run over, "
        "move that folder away (or use another --exp_name); to recover, put back a good checkpoint.pt."
    )


def save_checkpoint(state: dict, folder: Path) -> None:
    """Write ``checkpoint.pt``, keeping the previous one as ``checkpoint_prev.pt``. If writing fails (full disk), the
    checkpoints already there stay untouched."""
    path = folder / "checkpoint.pt"
    tmp = folder / "checkpoint.pt.new"
    files.write_atomic(tmp, lambda f: torch.save(state, f))
    if path.exists():
        os.replace(path, folder / "checkpoint_prev.pt")
    os.replace(tmp, path)


def permission_message(path: Path, err: OSError, then: str) -> str:
    """A file this user may not read (or write): a permission problem, not a damaged file; who owns it and what to
    do."""
    try:
        st = path.stat()
        owner = f" (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}; this process runs as uid {os.getuid()})"
    except OSError:
        owner = ""
    return (
        f"{path} cannot be read: permission denied{owner}. The file is not damaged; this user may not read it. Give "
        f"read permission (chmod u+r {path}, or run as its owner) and run the same command again to {then}."
    )


def load_best_model(path: Path, best_epoch: int, map_location="cpu") -> dict:
    """``bestmodel.pt``, the best-val weights the test is scored with (``weights_only``). RunFolderError when this
    user may not read it (a permission problem) or it is damaged (what to do: put back a good copy, or start over)."""
    try:
        best = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(best, dict) or not isinstance(best.get("model"), dict):
            raise ValueError("it holds no model weights")
    except PermissionError as err:
        raise RunFolderError(permission_message(path, err, "resume the run")) from None
    except FileNotFoundError:
        raise RunFolderError(
            f"{path} is missing: it held the best weights (epoch {best_epoch}), which the test is scored with. Put it "
            "back and run the same command again, or move the run folder away (or use another --exp_name) to start "
            "over."
        ) from None
    except Exception as err:  # truncated or corrupt: any unpickling, zip or read error
        raise RunFolderError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).strip()[:200]}): it is damaged, and it holds the "
            f"best weights (epoch {best_epoch}), which the test is scored with and no checkpoint keeps. Put back a "
            "good copy and run the same command again, or move the run folder away (or use another --exp_name) to "
            "train the run anew."
        ) from None
    return best


def log_lines_of(payload: dict) -> list[str] | None:
    """The log.jsonl lines a checkpoint covers, or None for a checkpoint of a version that did not carry them."""
    lines = payload.get("log")
    count = payload.get("progress", {}).get("log_lines")
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines) or len(lines) != count:
        return None
    return lines


def _complete_lines(path: Path) -> tuple[list[str], str | None]:
    """The complete lines of ``log.jsonl`` (each ended by a newline and a JSON object), and what is wrong after them
    (None: nothing)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], "it is missing"
    except (OSError, UnicodeDecodeError) as err:
        return [], f"it cannot be read ({err})"
    lines = []
    for number, line in enumerate(text.split("\n"), 1):
        if number > text.count("\n"):  # the part after the last newline
            return lines, f"its line {number} was cut short" if line else None
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            return lines, f"its line {number} is damaged"
        lines.append(line + "\n")
    return lines, None


def _logged_lines(path: Path, payload: dict) -> tuple[list[str], str | None]:
    """The log lines to resume with: those the checkpoint carries (log.jsonl is rewritten from them when it differs:
    deleted, cut, damaged, or holding epochs that run again), or, for a checkpoint of an older version that does not
    carry them, the file's first lines when they are whole. Else a RunFolderError: the record would have a gap."""
    log = path / "log.jsonl"
    count = payload.get("progress", {}).get("log_lines", 0)
    lines, problem = _complete_lines(log)
    carried = log_lines_of(payload)
    if carried is not None:
        carried = [line if line.endswith("\n") else line + "\n" for line in carried]
        if lines[:count] == carried:
            return carried, None
        why = problem or (
            "it differs from the checkpoint's record"
            if len(lines) >= count
            else f"it holds {len(lines)} of the {count} lines the checkpoint covers"
        )
        return carried, f"note: {log}: {why}; rebuilt from the checkpoint ({count} lines)"
    if len(lines) >= count:
        return lines[:count], None
    why = problem or f"it holds {len(lines)} of the {count} lines the checkpoint covers"
    raise RunFolderError(
        f"{log} is not whole: {why}. The checkpoint was written by an older version that does not carry the log's "
        "lines, so they cannot be rebuilt, and resuming would leave a log with a gap. Put back the whole log.jsonl "
        "and run the same command again, or move the run folder away (or use another --exp_name) to start over."
    )


def write_log(path: Path, lines: list[str]) -> None:
    """Write ``log.jsonl`` whole (atomically) from its lines: a line is never appended onto a cut one."""
    files.write_text_atomic(path, "".join(lines))
