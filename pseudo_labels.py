"""``python pseudo_labels.py --dataset D --clip MODEL``: the scoring pass of VLPL and AEVLP (``clip_scores``), once
per dataset and scorer, with the precision and recall of each method's pseudo-labels on it::

    python pseudo_labels.py --dataset coco --clip ViT-B-16                  # AEVLP's scorer, 4 x 4 grid
    python pseudo_labels.py --dataset coco --clip ViT-L-14-336 --grid 0     # VLPL's scorer, whole image only

It sits above ``clip_scores`` and ``methods`` (whose rules it reports on), so that neither imports the other.
"""

from __future__ import annotations

import tool_io  # first: notes a Ctrl-C while torch imports (see tool_io)

# isort: split
import argparse
import sys
from pathlib import Path

import torch

import clip_scores
import datasets
import files
import methods_vlp
import registry
import synthetic  # noqa: F401  (registers the synthetic dataset's generator)

INTERRUPTED = "interrupted; the images scored so far are kept: run the same command again."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=clip_scores.__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.DATASET_INFO))
    parser.add_argument(
        "--clip",
        required=True,
        help="open_clip model name (AEVLP: ViT-B-16; VLPL: ViT-L-14-336), or 'standin' (synthetic data)",
    )
    parser.add_argument(
        "--grid",
        type=int,
        default=None,
        help="crops per side (AEVLP: 4; CUB 5); 0: whole image only (default: AEVLP's for the dataset)",
    )
    parser.add_argument("--pretrained", default="openai", help="open_clip weights tag (default: openai, the papers')")
    parser.add_argument("--clip_weights", default=None, help="a local checkpoint file instead (offline)")
    parser.add_argument("--template", default=clip_scores.DEFAULT_TEMPLATE, help="prompt with {} for the class name")
    parser.add_argument("--prompts", default=None, help="a file of prompts, one a line per class, instead")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument(
        "--normalisation",
        default="imagenet",
        choices=sorted(clip_scores.NORMALISATIONS),
        help="pixel statistics (default imagenet, as both papers' code)",
    )
    parser.add_argument("--data_root", default=None, help="default: data/<dataset> in the repository")
    parser.add_argument("--cache_dir", default=None, help="where derived files go (default: the data root)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=256, help="crops per model call")
    parser.add_argument("--num_workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a file made with other settings")
    args = parser.parse_args(argv)
    root = Path(args.data_root) if args.data_root else datasets.default_root(args.dataset)
    info = datasets.DATASET_INFO[args.dataset]
    if info.sparse:
        print(f"error: {info.title} is not offered with pseudo-labels (no full class list per image)", file=sys.stderr)
        return 1
    aevlp = registry.REGISTRY["aevlp"]
    grid = (
        args.grid
        if args.grid is not None
        else registry.for_dataset(aevlp.presets["vlp_grid"], args.dataset, "vlp_grid")
    )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if info.prepare is not None:
            info.prepare(root)
        clip_scores.ensure_scores(
            args.dataset,
            root,
            datasets.derived_folder(args.dataset, root, args.cache_dir),
            args.clip,
            grid,
            weights=args.pretrained,
            weights_file=args.clip_weights,
            template=args.template,
            prompts_file=args.prompts,
            size=args.size,
            normalisation=args.normalisation,
            device=device,
            batch=args.batch,
            workers=args.num_workers,
            overwrite=args.overwrite,
            rules=methods_vlp.pseudo_label_rules(args.dataset, grid),
        )
    except (clip_scores.ScoreError, datasets.DataError, files.LockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    tool_io.run(main, interrupted=INTERRUPTED)
