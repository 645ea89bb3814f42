"""Command line -> one frozen, validated ``Config``; flag names follow the official release, so sweep scripts work.

Values a user does not give on the command line come from the dataset's preset (the authors' published best
settings, PAPER_FACTS section 2); ``Config.from_preset`` names them, and the printed and saved config says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from losses import BASELINES, SCHEMES
from models import ARCHS

REPO_DIR = Path(__file__).resolve().parent
DATASETS = ("synthetic", "pascal", "coco", "nuswide", "cub", "openimages")
OPTIMIZERS = ("adam", "sgd")
TRAIN_SET_VARIANTS = ("observed", "clean")
TRAIN_MODES = ("end_to_end", "linear_init")

# Per-dataset presets, used for every value below that is not given on the command line.
# - optimiser, lr, delta_rel (percent per epoch, per LL scheme): the LL authors' published best (PAPER_FACTS s. 2);
#   with BoostLU, its own published delta_rel.
# - expected_num_pos (EPR, ROLE): Cole et al.'s constants as PAPER_FACTS lists them.
# - em_alpha, apl_beta, apl_warmup (EM, EM+APL): Zhou et al.'s released per-dataset defaults.
# The synthetic values were tuned for the embedded demo (README, "The synthetic default").
_OFFICIAL = {"arch": "resnet50", "image_size": 448, "num_epochs": 10}
_BOOSTLU_DELTA_REL = {"LL-R": 0.5, "LL-Ct": 0.2, "LL-Cp": 0.1}


def _preset(optimizer, lr, ll_r, ll_ct, ll_cp, expected_num_pos, em_alpha, apl_beta, apl_warmup, **overrides) -> dict:
    return {
        **_OFFICIAL,
        "optimizer": optimizer,
        "lr": lr,
        "delta_rel": {"LL-R": ll_r, "LL-Ct": ll_ct, "LL-Cp": ll_cp},
        "boostlu_delta_rel": _BOOSTLU_DELTA_REL,
        "expected_num_pos": expected_num_pos,
        "em_alpha": em_alpha,
        "apl_beta": apl_beta,
        "apl_warmup": apl_warmup,
        **overrides,
    }


PRESETS: dict[str, dict] = {
    "pascal": _preset("sgd", 5e-3, 0.2, 0.2, 0.1, 1.5, 0.2, 0.02, 5),
    "coco": _preset("adam", 1e-5, 0.4, 0.2, 0.2, 2.9, 0.1, 0.9, 5),
    "nuswide": _preset("adam", 1e-5, 0.4, 0.2, 0.2, 1.9, 0.1, 0.2, 4),
    "cub": _preset("adam", 7.5e-5, 0.4, 0.4, 0.2, 31.4, 0.01, 0.4, 3),
    # The paper publishes no OpenImages settings: COCO's, the closest large-scale setting, as a starting point.
    # EPR, ROLE and EM+APL are not offered there (no expected count; per-image state of 3.4M x 5,000).
    "openimages": _preset("adam", 1e-5, 0.4, 0.2, 0.2, 0.0, 0.1, 0.9, 5),
    "synthetic": _preset(
        "adam", 1e-3, 1.0, 0.5, 0.5, 2.5, 0.1, 0.2, 5, arch="smallcnn", image_size=32, boostlu_delta_rel=None
    ),
}
# Config keys that say where things are and how fast they run, not what is trained: a run may be resumed with them
# changed, and runs differing only in them (and the seed) are seeds of one setting in a report.
NOT_TRAINING_SETTINGS = frozenset(
    {"num_workers", "cache", "data_root", "save_path", "exp_name", "device", "gpu_num", "compile", "debug", "resume",
     "from_preset"}
)  # fmt: skip
PRESET_FIELDS = (
    "arch", "image_size", "num_epochs", "optimizer", "lr", "delta_rel", "expected_num_pos", "em_alpha", "apl_beta",
    "apl_warmup",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    dataset: str
    mod_scheme: str
    delta_rel: float
    lr: float
    optimizer: str
    bsize: int
    num_epochs: int
    lr_mult: float
    arch: str
    use_pretrained: bool
    pretrained_weights: str
    image_size: int
    train_set_variant: str
    val_frac: float
    split_seed: int
    ss_seed: int
    ss_frac_train: float
    ss_frac_val: float
    num_workers: int
    seed: int
    data_root: str
    save_path: str
    exp_name: str
    device: str
    gpu_num: int
    loss: str = "an"
    expected_num_pos: float = 0.0
    ls_coef: float = 0.1
    em_alpha: float = 0.1
    apl_beta: float = 0.2
    apl_warmup: int = 5
    apl_neg_proportion: float = 0.9
    boostlu_alpha: float = 0.0
    train_mode: str = "end_to_end"
    linear_epochs: int = 25
    precision: str = "auto"
    compile: bool = False
    cache: str = "none"
    sync_bn: bool = True
    resume: bool = False
    debug: bool = False
    from_preset: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.exp_name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["from_preset"] = list(self.from_preset)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def validate(cfg: Config) -> list[str]:
    """Every rule a config must satisfy, as readable problems (empty when valid)."""
    p = []
    choices = {"dataset": DATASETS, "mod_scheme": SCHEMES, "optimizer": OPTIMIZERS, "arch": ARCHS}
    choices.update(train_set_variant=TRAIN_SET_VARIANTS, loss=BASELINES, train_mode=TRAIN_MODES)
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            p.append(f"--{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    if not 0 <= cfg.delta_rel <= 100:
        p.append(f"--delta_rel is in percent per epoch and must lie in [0, 100] (got {cfg.delta_rel})")
    elif cfg.mod_scheme == "LL-Cp" and cfg.delta_rel == 0:
        p.append("--delta_rel 0 with LL-Cp corrects nothing; use --mod_scheme AN for that")
    for name in ("lr", "lr_mult"):
        if not getattr(cfg, name) > 0:
            p.append(f"--{name} must be positive (got {getattr(cfg, name)})")
    for name in ("bsize", "num_epochs", "image_size"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    if not 0 < cfg.val_frac < 1:
        p.append(f"--val_frac must lie strictly between 0 and 1 (got {cfg.val_frac})")
    for name in ("ss_frac_train", "ss_frac_val"):
        if not 0 < getattr(cfg, name) <= 1:
            p.append(f"--{name} must lie in (0, 1] (got {getattr(cfg, name)})")
    if cfg.num_workers < 0:
        p.append(f"--num_workers must be >= 0 (got {cfg.num_workers})")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        p.append(f"--precision must be auto, bf16 or fp32 (got {cfg.precision!r})")
    if cfg.cache not in ("none", "disk"):
        p.append(f"--cache must be none or disk (got {cfg.cache!r})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        p.append(f"--device must be auto, cpu or cuda (got {cfg.device!r})")
    if cfg.train_set_variant == "clean" and (cfg.mod_scheme != "AN" or cfg.loss != "an"):
        p.append(
            "--train_set_variant clean trains on full labels with plain BCE: no entry is unobserved, so there is "
            "nothing to reject, correct or regularise; use --mod_scheme AN --loss an (the defaults with clean)"
        )
    if cfg.mod_scheme != "AN" and cfg.loss != "an":
        p.append(f"--mod_scheme {cfg.mod_scheme} modifies the AN loss; combine it with --loss an, not {cfg.loss}")
    if cfg.dataset == "openimages" and cfg.loss in ("epr", "role", "em_apl"):
        p.append(f"--loss {cfg.loss} is not available for OpenImages (see README, Baselines)")
    if cfg.loss in ("epr", "role") and not cfg.expected_num_pos > 0:
        p.append(f"--loss {cfg.loss} needs --expected_num_pos > 0 (got {cfg.expected_num_pos})")
    if not 0 <= cfg.ls_coef < 0.5:
        p.append(f"--ls_coef must lie in [0, 0.5) (got {cfg.ls_coef})")
    for name in ("em_alpha", "apl_beta", "boostlu_alpha"):
        if getattr(cfg, name) < 0:
            p.append(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    if not 0 < cfg.apl_neg_proportion <= 1:
        p.append(f"--apl_neg_proportion must lie in (0, 1] (got {cfg.apl_neg_proportion})")
    if cfg.loss == "em_apl" and not 1 <= cfg.apl_warmup < cfg.num_epochs:
        p.append(f"--apl_warmup must lie in [1, num_epochs) (got {cfg.apl_warmup} with {cfg.num_epochs} epochs)")
    if cfg.linear_epochs < 1:
        p.append(f"--linear_epochs must be a positive integer (got {cfg.linear_epochs})")
    if cfg.train_mode == "linear_init" and cfg.boostlu_alpha > 0:
        p.append("--train_mode linear_init trains a linear head on pooled features; BoostLU needs the CAM form")
    if cfg.dataset == "openimages" and cfg.train_set_variant == "clean":
        p.append("OpenImages has no full labels: --train_set_variant clean is not available for it")
    if not cfg.exp_name or "/" in cfg.exp_name or cfg.exp_name in (".", ".."):
        p.append(f"--exp_name must be a plain folder name (got {cfg.exp_name!r})")
    return p


def str2bool(value: str) -> bool:
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Large Loss Matters (CVPR 2022): train a multi-label classifier from single positive labels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", default="synthetic", choices=DATASETS)
    parser.add_argument("--mod_scheme", default=None, choices=SCHEMES, help="default LL-R (AN with clean labels)")
    parser.add_argument("--delta_rel", type=float, default=None, help="percent per epoch (default: preset)")
    parser.add_argument("--lr", type=float, default=None, help="backbone learning rate (default: preset)")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="default: preset")
    parser.add_argument("--bsize", type=int, default=16, help="batch size")
    parser.add_argument("--num_epochs", type=int, default=None, help="epochs (default 10)")
    parser.add_argument("--lr_mult", type=float, default=10.0, help="the head's learning rate is lr * lr_mult")
    parser.add_argument("--arch", default=None, choices=ARCHS, help="default resnet50; synthetic smallcnn")
    parser.add_argument(
        "--use_pretrained", type=str2bool, nargs="?", const=True, default=True, help="pretrained backbone"
    )
    parser.add_argument("--pretrained_weights", default="IMAGENET1K_V1", help="torchvision weights name for ResNets")
    parser.add_argument(
        "--image_size", type=int, default=None, help="resize to this square (default 448; synthetic 32)"
    )
    parser.add_argument(
        "--train_set_variant", default="observed", choices=TRAIN_SET_VARIANTS, help="single positive or full labels"
    )
    parser.add_argument("--val_frac", type=float, default=0.2, help="fraction of the official train split held out")
    parser.add_argument("--split_seed", type=int, default=1200, help="seed of the official train/val split")
    parser.add_argument("--ss_seed", type=int, default=999, help="seed of the optional subsampling")
    parser.add_argument("--ss_frac_train", type=float, default=1.0, help="fraction of train images kept")
    parser.add_argument("--ss_frac_val", type=float, default=1.0, help="fraction of val images kept")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers (default: the cores; 0 for synthetic)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and flips")
    parser.add_argument("--data_root", default=None, help="dataset folder (default: data/<dataset> in the repo)")
    parser.add_argument("--save_path", default="results", help="parent folder of run folders")
    parser.add_argument("--exp_name", default=None, help="run folder name (default: dataset_scheme_delta_seed_time)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--gpu_num", type=int, default=0, help="CUDA device index")
    speed = parser.add_argument_group("speed (none of these changes what the model sees)")
    speed.add_argument(
        "--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    speed.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False, help="torch.compile the model")
    speed.add_argument(
        "--cache", default="none", choices=("none", "disk"), help="disk: decode and resize every image once, to disk"
    )
    speed.add_argument(
        "--sync_bn", type=str2bool, nargs="?", const=True, default=True, help="SyncBatchNorm under torchrun on CUDA"
    )
    parser.add_argument("--resume", action="store_true", help="resume the run in the run folder (also automatic)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    baselines = parser.add_argument_group("baselines, BoostLU and LinearInit")
    baselines.add_argument("--loss", default="an", choices=BASELINES, help="an is the loss the LL schemes modify")
    baselines.add_argument("--expected_num_pos", type=float, default=None, help="EPR/ROLE (default: preset)")
    baselines.add_argument("--ls_coef", type=float, default=0.1, help="LSAN label smoothing")
    baselines.add_argument("--em_alpha", type=float, default=None, help="EM entropy weight (default: preset)")
    baselines.add_argument("--apl_beta", type=float, default=None, help="APL pseudo-label weight (default: preset)")
    baselines.add_argument("--apl_warmup", type=int, default=None, help="APL's first labelling epoch (default: preset)")
    baselines.add_argument("--apl_neg_proportion", type=float, default=0.9, help="APL: share of unobserved labelled")
    baselines.add_argument("--boostlu_alpha", type=float, default=0.0, help="BoostLU's alpha; 0 = off (paper: 5)")
    baselines.add_argument("--train_mode", default="end_to_end", choices=TRAIN_MODES)
    baselines.add_argument("--linear_epochs", type=int, default=25, help="LinearInit: epochs of the frozen phase")
    return parser


def _default_num_workers(dataset: str) -> int:
    """The available cores, shared among the processes torchrun starts on this machine. The synthetic images are
    32x32 PNGs: decoding them in the main process is faster than feeding worker processes."""
    if dataset == "synthetic":
        return 0
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def method_name(values: dict) -> str:
    """A short name of what a run trains, e.g. ``coco_LL-R_d0.4``, ``coco_wan``, ``pascal_LL-Ct_d0.2_boostlu5_li``."""
    if values["train_set_variant"] == "clean":
        name = "full"
    elif values["loss"] != "an":
        name = values["loss"]
    elif values["mod_scheme"] == "AN":
        name = "AN"
    else:
        name = f"{values['mod_scheme']}_d{values['delta_rel']:g}"
    if values["boostlu_alpha"] > 0:
        name += f"_boostlu{values['boostlu_alpha']:g}"
    if values["train_mode"] == "linear_init":
        name += "_li"
    return f"{values['dataset']}_{name}"


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve presets and defaults, then build (and so validate) the frozen config."""
    values = dict(vars(args))
    preset = PRESETS[values["dataset"]]
    if values["mod_scheme"] is None:
        values["mod_scheme"] = "LL-R" if values["train_set_variant"] == "observed" and values["loss"] == "an" else "AN"
    from_preset = [name for name in PRESET_FIELDS if values[name] is None]
    for name in from_preset:
        values[name] = preset[name]
    if "delta_rel" in from_preset:
        per_scheme = preset["boostlu_delta_rel"] if values["boostlu_alpha"] > 0 else None
        values["delta_rel"] = (per_scheme or preset["delta_rel"]).get(values["mod_scheme"], 0.0)
    values["from_preset"] = tuple(from_preset)
    if values["num_workers"] is None:
        values["num_workers"] = _default_num_workers(values["dataset"])
    if values["data_root"] is None:
        values["data_root"] = str(REPO_DIR / "data" / values["dataset"])
    if values["exp_name"] is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        values["exp_name"] = f"{method_name(values)}_s{values['seed']}_{stamp}"
    return Config(**values)


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line; any invalid value exits with argparse's usage message (status 2), never a traceback."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
