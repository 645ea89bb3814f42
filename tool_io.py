"""How the command-line tools start and end: Ctrl-C, a closed stdout pipe, file names of any bytes on any stdout, and
output paths that would replace what the command did not make.

main.py, predict.py, cam.py, report.py and ``python datasets.py`` import this module before anything else and end
through :func:`run`:

- **Ctrl-C while starting.** Importing torch takes a second or more. Imported by a tool run as a script, this module
  notes a Ctrl-C in that time instead of raising (a ``KeyboardInterrupt`` inside an import leaves a traceback from
  inside torch, or is swallowed by it); :func:`run` then ends with one line and exit status 130. Only where Ctrl-C has
  Python's own handler: a tool started with it ignored (``python main.py &`` in a script) keeps ignoring it. A second
  Ctrl-C acts at once (an import that hangs).
- **Ctrl-C later** ends with the tool's one line (``error: Interrupted (Ctrl-C) ...``) and 130, never a traceback.
- **A closed stdout** (``predict.py ... | head``) ends quietly, as Unix tools do: killed by SIGPIPE (the shell reports
  141), no ``BrokenPipeError`` traceback.
- **File names that are not valid UTF-8** (bytes the OS allows in a name, read by Python as lone surrogates) are
  written to stdout and stderr as their original bytes, whatever the stream's encoding and error handler (a strict
  UTF-8 stdout, ``PYTHONIOENCODING=utf-8:strict``, would otherwise raise); a character the stream's encoding cannot
  hold is written as a backslash escape. :func:`encode_text` does the same for files the tools write.

:func:`refuse_overwrite` refuses an output path that is one of the command's inputs, a run folder or one of its files,
comparing the files themselves (inode, resolved path), not their spellings.

This module imports only the standard library, so that it is loaded before torch.
"""

from __future__ import annotations

import codecs
import os
import select
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

INTERRUPTED_STARTING = "Interrupted (Ctrl-C) while starting: nothing was written."
# The files main.py writes in a run folder (checkpoint.py, train.py), and their temporary twins (files.write_atomic).
RUN_FOLDER_FILES = (
    "config.json",
    "data.json",
    "log.jsonl",
    "final.json",
    "bestmodel.pt",
    "checkpoint.pt",
    "checkpoint_prev.pt",
    ".lock",
)

FILE_NAME_ERRORS = "largeloss_bytes"  # the codec error handler registered below: ``open(..., errors=)``


def _bytes_or_escape(err: UnicodeError) -> tuple[bytes, int]:
    """Encode error handler: a lone surrogate U+DC80..U+DCFF (a byte of a file name that is not valid UTF-8, as
    Python's ``surrogateescape`` reads it) becomes that byte again; any other character the encoding cannot hold
    becomes a backslash escape (``\\xe9``, ``\\u65e5``)."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    out = bytearray()
    for char in err.object[err.start : err.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += char.encode("ascii", "backslashreplace")
    return bytes(out), err.end


codecs.register_error(FILE_NAME_ERRORS, _bytes_or_escape)


def encode_text(text: str, encoding: str = "utf-8") -> bytes:
    """``text`` as bytes for a file: a file name that is not valid UTF-8 keeps its original bytes (see above)."""
    return text.encode(encoding, FILE_NAME_ERRORS)


def use_any_file_name(stream) -> None:
    """Make a text stream (``sys.stdout``, ``sys.stderr``) write every file name, in any encoding (see above)."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors=FILE_NAME_ERRORS)


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C while the tool imports torch.

_interrupts_while_starting: list[int] = []


def _note_interrupt(signum, frame) -> None:
    if _interrupts_while_starting:  # a second Ctrl-C: at once (an import that hangs)
        raise KeyboardInterrupt
    _interrupts_while_starting.append(signum)


def _started_as_a_tool() -> bool:
    """Whether the running script is one of this folder's tools (not pytest, an import, or a DataLoader worker started
    by ``spawn``, whose main module is ``__mp_main__``), with Python's own Ctrl-C handler."""
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if getattr(main, "__name__", None) != "__main__" or not main_file:
        return False
    here = os.path.dirname(os.path.realpath(__file__))
    return (
        os.path.dirname(os.path.realpath(main_file)) == here
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )


_NOTING = _started_as_a_tool()
if _NOTING:
    signal.signal(signal.SIGINT, _note_interrupt)


# ---------------------------------------------------------------------------------------------------------------------
# The end of a tool.


def _is_closed_pipe(fd: int) -> bool:
    """Whether ``fd`` is a pipe whose reading end has been closed (``poll`` reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):  # no poll on this platform, fd closed, ...
        return False
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in events)


def output_closed() -> bool:
    """Whether stdout or stderr is a pipe that nobody reads any more (``... | head`` has exited)."""
    return any(_is_closed_pipe(fd) for fd in (1, 2))


def _end_quietly_on_closed_pipe() -> NoReturn:
    """End as a Unix tool does when its reader has gone: killed by SIGPIPE, with nothing more written."""
    try:  # nothing more reaches the closed pipe, not even the interpreter's flush at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            if _is_closed_pipe(fd):
                os.dup2(devnull, fd)
    except OSError:
        pass
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + 13)  # where there is no SIGPIPE: the status a shell gives a tool it killed


def run(main: Callable[[], int], *, interrupted: str) -> NoReturn:
    """Run a tool's ``main()`` and exit with its status. ``interrupted``: the one line (after ``error: ``) that a
    Ctrl-C the tool's own ``main`` does not catch ends with (status 130). See the module docstring."""
    if _NOTING:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C raises KeyboardInterrupt
    use_any_file_name(sys.stdout)
    use_any_file_name(sys.stderr)
    if _interrupts_while_starting:
        print(f"error: {INTERRUPTED_STARTING}", file=sys.stderr)
        sys.exit(130)
    pipe_closed = False
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit: a closed pipe is then seen like any other
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        if not output_closed():  # a pipe of something else: not ours to hide
            raise
        pipe_closed = True
    if pipe_closed:  # outside the except block, so that the exception's frames (loaders, workers) are freed first
        _end_quietly_on_closed_pipe()
    sys.exit(code)


def reraise_if_output_closed(err: BaseException) -> None:
    """For a tool's ``except OSError`` handler: a ``BrokenPipeError`` from a closed stdout goes on to :func:`run`,
    which ends quietly, rather than being reported as a file problem."""
    if isinstance(err, BrokenPipeError) and output_closed():
        raise err


# ---------------------------------------------------------------------------------------------------------------------
# Outputs that would replace what the command did not make.


class OverwriteRefused(Exception):
    """An output path names an input, a run folder or one of its files; the message says which and what to do."""


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder main.py has written: it holds ``bestmodel.pt``, or ``config.json`` and another
    file of a run (a run that has just started holds ``config.json``, ``.lock`` and ``data.json``)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    others = [name for name in RUN_FOLDER_FILES if name != "config.json"]
    return (folder / "bestmodel.pt").is_file() or (
        (folder / "config.json").is_file() and any((folder / name).exists() for name in others)
    )


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode when both exist (symbolic and hard links, ``./``,
    case-insensitive file systems), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwrite(
    output: str | os.PathLike, flag: str, *, inputs: Iterable[str | os.PathLike] = (), run_dirs: Iterable = ()
) -> None:
    """Raise ``OverwriteRefused`` when the output path ``output`` (given as ``flag``) is one of ``inputs``, one of
    ``run_dirs`` or a file main.py writes in one of them, or a file main.py writes in the run folder it lies in (any
    run, not only those named). Nothing is written before this check."""
    output = Path(output)
    advice = "nothing was written. Choose another path: this command never replaces what it did not make."
    temporary = output.with_name(output.name + ".tmp") if output.name else None  # files.write_atomic writes there
    inputs = list(inputs)
    for candidate, what in ((output, "is"), (temporary, f"would be written through {temporary}, which is")):
        if candidate is None or not os.path.lexists(candidate):  # a path that is not there is no input
            continue
        for given in inputs:
            if _same_file(candidate, given):
                same = "" if os.fspath(given) == os.fspath(candidate) else f" ({given})"
                raise OverwriteRefused(f"{flag} {output} {what} one of this command's inputs{same}; {advice}")
    parent = output.parent
    runs = [Path(r) for r in run_dirs] + ([parent] if is_run_folder(parent) else [])
    for run_dir in runs:
        if _same_file(output, run_dir):
            raise OverwriteRefused(f"{flag} {output} is the run folder {run_dir}; {advice}")
        for name in RUN_FOLDER_FILES:
            for kept in (name, name + ".tmp"):
                if _same_file(output, run_dir / kept):
                    raise OverwriteRefused(f"{flag} {output} is the run folder's {run_dir / kept}; {advice}")
    if is_run_folder(output):
        raise OverwriteRefused(f"{flag} {output} is a run folder of main.py; {advice}")
