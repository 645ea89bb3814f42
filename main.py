"""Entry point: ``python main.py --dataset coco --mod_scheme LL-R`` (no arguments: the embedded synthetic demo)."""

import sys

import config
import datasets
import models
import train

USER_ERRORS = (datasets.DataError, models.PretrainedWeightsUnavailable, train.TrainingError)


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
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
