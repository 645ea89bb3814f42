"""Entry point: ``python main.py --dataset coco --mod_scheme LL-R`` (no arguments: the embedded synthetic demo)."""

import sys

import config
import datasets
import models
import train


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse_config(argv)
    try:
        train.run(cfg)
    except (datasets.DataError, models.PretrainedWeightsUnavailable, train.TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
