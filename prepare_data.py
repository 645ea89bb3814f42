"""``python prepare_data.py <name>``: prepare a dataset without training: format the raw official annotations,
generate the observed labels, check that every image is there and that a sample decodes (``datasets.prepare``).

It sits above both ``datasets`` and ``synthetic`` (whose generator it registers), so that neither imports the other
both ways. ``python datasets.py <name>`` still works: it runs this file.
"""

from __future__ import annotations

import tool_io  # first: notes a Ctrl-C while torch imports (see tool_io)

# isort: split
import argparse
import sys

import datasets
import files
import synthetic  # noqa: F401  (registers the synthetic dataset's generator)

CLI_INTERRUPTED = "interrupted; every file written so far is complete: run the same command again."


def cli(argv: list[str] | None = None) -> int:
    """``python prepare_data.py <name> [--data_root DIR] [--cache_dir DIR]``: exit 0 when ready, 1 with a message."""
    parser = argparse.ArgumentParser(description=datasets.prepare.__doc__)
    parser.add_argument("dataset", choices=sorted(datasets.DATASET_INFO))
    parser.add_argument("--data_root", default=None, help="default: data/<dataset> in the repository")
    parser.add_argument("--cache_dir", default=None, help="where derived files go (default: the data root)")
    args = parser.parse_args(argv)
    try:
        datasets.prepare(args.dataset, args.data_root, args.cache_dir)
    except (datasets.DataError, files.LockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        tool_io.reraise_if_output_closed(err)  # `python prepare_data.py D | head`: ends quietly (tool_io.run)
        print(
            f"error: cannot use {err.filename or args.data_root}: {err.strerror or err}. Check --data_root and "
            "--cache_dir.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"error: {CLI_INTERRUPTED}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    tool_io.run(cli, interrupted=CLI_INTERRUPTED)
