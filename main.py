"""Entry point: ``python main.py --dataset coco --mod_scheme LL-R`` (no arguments: the embedded synthetic demo).

Several GPUs or nodes: ``torchrun --nproc_per_node N main.py ...`` (the same flags; ``--bsize`` stays the global batch).
"""

import sys

import checkpoint
import config
import datasets
import models
import train

USER_ERRORS = (
    datasets.DataError,
    models.PretrainedWeightsUnavailable,
    train.TrainingError,
    checkpoint.RunFolderError,
    train.Interrupted,
)


def user_message(err: Exception) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back with the worker's traceback
    prepended ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep only the message."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rpartition(marker)[2]
    return text.strip()


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse_config(argv)
    try:
        train.run(cfg)
    except USER_ERRORS as err:
        if cfg.debug:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 130 if isinstance(err, train.Interrupted) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
