"""Command line -> one frozen, validated ``Config``; flag names follow the official release, so sweep scripts work.

The protocol's flags are declared here; the methods' flags, their per-dataset presets and their rules come from the
method registry (``registry.REGISTRY``), and the datasets with their dataset-level presets (optimiser, learning rate,
architecture, image size, epochs) from ``datasets.DATASET_INFO``. Values a user does not give on the command line come
from those presets (the authors' published settings; docs/methods.md); ``Config.from_preset`` names them, and the
printed and saved config marks them "(preset)". ``python main.py --list_methods`` prints the registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import label_rules
import methods  # noqa: F401  (the built-in entries fill the registry the config is built from)
import methods_vlp  # noqa: F401  (and VLPL's and AEVLP's)
import models
import registry
from config_rules import (
    CACHES,
    CUDA_GRAPHS,
    DEVICES,
    EVAL_RESIZES,
    OPTIMIZERS,
    PRECISIONS,
    availability_problems,
    dataset_constant_problems,
    dataset_names,
    validate,
)
from models import ARCHS, RESNETS

REPO_DIR = Path(__file__).resolve().parent
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
# Dataset-level presets, from ``datasets.DATASET_INFO[dataset].defaults``, in the order ``from_preset`` lists them.
DATASET_PRESETS = ("arch", "image_size", "num_epochs", "optimizer", "lr")
DEFAULT_WEIGHTS = "IMAGENET1K_V1"  # torchvision's ImageNet weights of the ResNets, as the official code loads them
# Config keys that say where things are and how fast they run, not what is trained: a run may be resumed with them
# changed, and runs differing only in them (and the seed) are seeds of one setting in a report. checkpoint.py gets
# this constant from its caller (it does not import this module).
NOT_TRAINING_SETTINGS = frozenset(
    {
        "num_workers",
        "cache",
        "cache_dir",
        "data_root",
        "save_path",
        "exp_name",
        "device",
        "gpu_num",
        "compile",
        "cuda_graph",
        "eval_resize",
        "debug",
        "resume",
        "from_preset",
    }
)


DATASETS = dataset_names()  # as at import; ``dataset_names()`` follows later additions


@dataclass(frozen=True)
class ConfigCore:
    """The protocol's settings. ``Config`` is this plus one field per flag of the method registry
    (``registry.flags()``), with the flag's default; build it with ``parse_config`` or ``config_from_args``."""

    dataset: str
    mod_scheme: str
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
    train_mode: str = "end_to_end"
    num_pos: int = 1
    num_neg: int = 0
    label_proportion: float | None = None
    label_proportion_seed: int = label_rules.OBSERVED_SEED
    precision: str = "auto"
    compile: bool = False
    cuda_graph: str = "auto"
    eval_resize: str = "workers"
    cache: str = "none"
    cache_dir: str | None = None
    sync_bn: bool = True
    resume: bool = False
    debug: bool = False
    pretrained_path: str | None = None
    from_preset: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # config.json holds tuples as lists: read them back as tuples
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        problems = type_problems(dataclasses.asdict(self)) or validate(self)  # the rules compare typed values
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.exp_name

    def to_dict(self) -> dict:
        """The config as ``config.json`` holds it (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _registry_problems() -> list[str]:
    """What in the registry does not fit the datasets or the protocol's fields (a half-made entry)."""
    problems = []
    core = {f.name for f in dataclasses.fields(ConfigCore)}
    known_flags = registry.flags()
    known_datasets = set(dataset_names())
    for name in core & set(known_flags):
        problems.append(f"flag --{name} of the registry is already a protocol field of config.py")
    for m in registry.entries():
        presets = [(m.presets, "presets")]
        presets += [(p, f"presets_with[{s!r}]") for s, p in m.presets_with.items()]
        for mapping, where in presets:
            for flag in mapping:
                if flag not in known_flags:
                    problems.append(f"{m.name!r} {where} names --{flag}, which no entry declares in its flags")
        tables = [m.paper, *m.paper_with.values()]
        for table in tables:
            for per_dataset in table.values():
                if set(per_dataset) - known_datasets:
                    problems.append(
                        f"{m.name!r} paper numbers name unknown datasets {sorted(set(per_dataset) - known_datasets)}"
                    )
        for scheme in m.applies_to:
            if scheme not in registry.names(registry.SCHEME):
                problems.append(f"{m.name!r} applies_to names {scheme!r}, which is not a registered scheme")
        unknown = set(m.not_on) | set(m.table_skip)
        if unknown - known_datasets:
            problems.append(f"{m.name!r} not_on / table_skip names unknown datasets {sorted(unknown - known_datasets)}")
    return problems + dataset_constant_problems()


def _build_config_class() -> type:
    problems = _registry_problems()
    if problems:
        raise registry.MethodError("the method registry is incomplete: " + "; ".join(problems))
    fields = []
    for flag in registry.flags().values():
        default = tuple(flag.default) if isinstance(flag.default, list) else flag.default
        kind = flag.type if isinstance(flag.type, type) else Any
        fields.append((flag.name, kind, dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass("Config", fields, bases=(ConfigCore,), frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = "One run's settings: ``ConfigCore``'s protocol fields and the registered methods' flags."
    return cls


Config = _build_config_class()
_built_for = registry.registry_version()


def _ensure_current() -> None:
    """Rebuild ``Config`` when entries were registered or removed since it was built; check the dataset entries'
    constants against the registry (a dataset entry may be added at any time)."""
    global Config, _built_for
    if _built_for != registry.registry_version():
        Config = _build_config_class()
        _built_for = registry.registry_version()
    problems = dataset_constant_problems()
    if problems:
        raise registry.MethodError("the dataset entries are incomplete: " + "; ".join(problems))


def config_defaults() -> dict:
    """The ``Config`` fields that have a default, with it (what an older ``config.json`` without them is read as)."""
    _ensure_current()
    return {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


# A field's annotation -> the JSON values it accepts, and how a message names them.
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "None": "null"}


def type_problems(values: Mapping[str, Any]) -> list[str]:
    """Settings whose value is not of their field's type (a hand-edited ``config.json``: ``"image_size": "abc"``),
    as readable problems; a tuple setting (``--gr_sigma``, ...) holds numbers. Settings not given are not checked."""
    p = []
    for field in dataclasses.fields(Config):
        if field.name not in values:
            continue
        value = values[field.name]
        flag = registry.flags().get(field.name)
        if field.name == "from_preset":
            ok, wanted = isinstance(value, (list, tuple)), "a list"
        elif flag is not None and flag.nargs is not None:
            ok = isinstance(value, (list, tuple)) and len(value) == flag.nargs
            ok = ok and all(_of_type(v, _TYPES["float"]) for v in value)
            wanted = f"a list of {flag.nargs} numbers"
        else:
            names = [n.strip() for n in str(getattr(field.type, "__name__", field.type)).split("|")]
            ok = any(_of_type(value, _TYPES.get(n, (object,))) for n in names)
            wanted = " or ".join(_TYPE_WORDS.get(n, n) for n in names)
        if not ok:
            p.append(f"{field.name} must be {wanted} (got {value!r})")
    return p


def _of_type(value, types: tuple) -> bool:
    """JSON's true and false are no numbers."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def str2bool(value: str) -> bool:
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def _add_flag(group, flag: registry.Flag, preset: bool) -> None:
    """A registry flag: default None when it has presets (resolved in ``config_from_args``), else its default."""
    kwargs: dict[str, Any] = {"type": flag.type, "help": flag.help, "default": None if preset else flag.default}
    if flag.nargs is not None:
        kwargs["nargs"] = flag.nargs
    group.add_argument(f"--{flag.name}", **kwargs)


def get_args_parser() -> argparse.ArgumentParser:
    _ensure_current()
    presets = set(registry.preset_flags())
    registry_flags = registry.flags()
    scheme_flags = [f for m in registry.entries(registry.SCHEME) for f in m.flags]
    parser = argparse.ArgumentParser(
        description="Large Loss Matters (CVPR 2022): train a multi-label classifier from single positive labels.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # a flag is named in full: --mod is no silent --mod_scheme, and repeats can be told apart
    )
    # argparse takes only -5 and -.5 for negative numbers and reads -1e308 or -2.5e0 as an option: a pair flag
    # (--gr_w -1e308 2) then says "expected 2 arguments". Every float spelling is a number (no flag starts so).
    parser._negative_number_matcher = NEGATIVE_NUMBER
    parser.add_argument("--dataset", default="synthetic", choices=dataset_names())
    parser.add_argument(
        "--mod_scheme",
        default=None,
        choices=registry.names(registry.SCHEME),
        help="default LL-R (AN with clean labels or a --loss other than an)",
    )
    for flag in dict.fromkeys(scheme_flags):
        _add_flag(parser, flag, flag.name in presets)
    parser.add_argument("--lr", type=float, default=None, help="backbone learning rate (default: preset)")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="default: preset")
    parser.add_argument("--bsize", type=int, default=16, help="batch size")
    parser.add_argument("--num_epochs", type=int, default=None, help="epochs (default 10)")
    parser.add_argument("--lr_mult", type=float, default=10.0, help="the head's learning rate is lr * lr_mult")
    parser.add_argument(
        "--arch",
        default=None,
        help=f"{', '.join(ARCHS)} or timm:NAME, any timm model (pip install timm; --list_archs). Default resnet50 "
        "(torchvision's, as the paper); synthetic smallcnn",
    )
    parser.add_argument(
        "--use_pretrained", type=str2bool, nargs="?", const=True, default=True, help="pretrained backbone"
    )
    parser.add_argument("--pretrained_weights", default=DEFAULT_WEIGHTS, help="torchvision weights name for ResNets")
    parser.add_argument(
        "--pretrained_path",
        default=None,
        help="the backbone's pretrained weights from this local file (.safetensors or a torch state dict) instead of "
        "a download, for a ResNet or a timm model; checked against the model's keys",
    )
    parser.add_argument(
        "--image_size", type=int, default=None, help="resize to this square (default 448; synthetic 32)"
    )
    parser.add_argument(
        "--train_set_variant",
        default="observed",
        choices=registry.names(registry.VARIANT),
        help="single positive or full labels",
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
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="where files derived from the data go (observed labels, --cache disk, LinearInit features); default: "
        "the data root, or a per-user cache folder when the data root is read-only",
    )
    parser.add_argument("--save_path", default="results", help="parent folder of run folders")
    name = "<dataset>_<scheme or loss>[_d<delta>]_s<seed>_<time>"
    parser.add_argument("--exp_name", default=None, help=f"run folder name (default: {name})")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--gpu_num", type=int, default=0, help="CUDA device index")
    regime = parser.add_argument_group("partial-label regime (the paper: one positive per image)")
    regime.add_argument("--num_pos", type=int, default=1, help="observed positives per image (official generator)")
    regime.add_argument("--num_neg", type=int, default=0, help="observed negatives per image (official generator)")
    regime.add_argument(
        "--label_proportion",
        type=float,
        default=None,
        help="instead: each label of each image known with this probability, positives and negatives alike",
    )
    regime.add_argument(
        "--label_proportion_seed",
        type=int,
        default=label_rules.OBSERVED_SEED,
        help="the --label_proportion draw's seed: 1200 (default, the official generator's seed) or 0, which gives "
        "exactly HCP-MLR-PL's files (its changeLabelProportion, on which SST, SARB and HST trained)",
    )
    speed = parser.add_argument_group("speed and precision")
    speed.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32: the official precision (the layout stays channels-last, "
        "so not bit for bit the official NCHW arithmetic: docs/protocol.md)",
    )
    speed.add_argument(
        "--compile",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="torch.compile the training step (full batches; the last batch and evaluation run eagerly) and replay it "
        "as a CUDA graph under --cuda_graph auto: faster steps after about a minute of compilation on every start, "
        "so it pays on long runs, not short ones; fused kernels may round differently (docs/performance.md)",
    )
    speed.add_argument(
        "--cuda_graph",
        default="auto",
        choices=CUDA_GRAPHS,
        help="replay the training forward and backward of full batches as a CUDA graph (one launch instead of "
        "hundreds, which frees a launch-bound step; measurements: docs/performance.md); auto: on a single CUDA device "
        "(with --compile too), else off",
    )
    speed.add_argument(
        "--eval_resize",
        default="workers",
        choices=EVAL_RESIZES,
        help="where validation and test images are resized to --image_size: workers (PIL, as the paper) or device "
        "(the loader's workers only decode, and the model's device resizes with PIL's arithmetic: the same pixels, "
        "checked against PIL at start, also on the data's first images). May pay where the host has few cores per "
        "GPU; slower than workers where it has many, and on a CPU device much slower than PIL (docs/performance.md)",
    )
    speed.add_argument(
        "--cache", default="none", choices=CACHES, help="disk: decode and resize every image once, to disk"
    )
    speed.add_argument(
        "--sync_bn", type=str2bool, nargs="?", const=True, default=True, help="SyncBatchNorm under torchrun on CUDA"
    )
    parser.add_argument("--resume", action="store_true", help="resume the run in the run folder (also automatic)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument(
        "--list_methods", action="store_true", help="print the methods, their flags and presets, and exit"
    )
    parser.add_argument(
        "--list_archs",
        action="store_true",
        help="print the architectures --arch takes and how to find timm's, and exit",
    )
    parser.add_argument(
        "--names",
        action="store_true",
        help="with --list_methods: the table's rows for --dataset and --train_mode, one per line: row, 'table' "
        "(run by scripts/reproduce_table.sh by default) or 'extra', and the flags that select it, tab-separated",
    )
    baselines = parser.add_argument_group("baselines, BoostLU and LinearInit (the method registry, methods.py)")
    baselines.add_argument(
        "--loss", default="an", choices=registry.names(registry.LOSS), help="an is the loss the LL schemes modify"
    )
    mode_flags = [f for m in registry.entries(registry.MODE) for f in m.flags]
    for flag in registry_flags.values():
        if flag not in scheme_flags and flag not in mode_flags:
            _add_flag(baselines, flag, flag.name in presets)
    baselines.add_argument("--train_mode", default="end_to_end", choices=registry.names(registry.MODE))
    for flag in dict.fromkeys(mode_flags):
        if flag not in scheme_flags:
            _add_flag(baselines, flag, flag.name in presets)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says it (a preset, "the cores") or there is
    none (None: resolved later)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _default_num_workers(info: datasets.DatasetInfo) -> int:
    """The dataset entry's ``num_workers`` default when it has one (the synthetic images are 32x32 PNGs: decoding them
    in the main process is faster than feeding worker processes), else the available cores, shared among the
    processes torchrun starts on this machine."""
    if "num_workers" in info.defaults:
        return int(info.defaults["num_workers"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def regime_name(values: dict) -> str:
    """The partial-label regime in a run name: '' for the paper's single positive, else e.g. ``_p2n1``, ``_prop0.3``."""
    if values.get("label_proportion") is not None:
        seed = values.get("label_proportion_seed", label_rules.OBSERVED_SEED)
        return f"_prop{values['label_proportion']:g}" + ("" if seed == label_rules.OBSERVED_SEED else f"_seed{seed}")
    if (values.get("num_pos", 1), values.get("num_neg", 0)) != (1, 0):
        return f"_p{values['num_pos']}n{values['num_neg']}"
    return ""


def method_name(values: dict) -> str:
    """A short name of what a run trains, e.g. ``coco_LL-R_d0.4``, ``coco_wan``, ``pascal_LL-Ct_d0.2_boostlu5_li``,
    ``coco_LL-R_d0.4_p2n1``."""
    variant = registry.get(values["train_set_variant"], registry.VARIANT)
    loss = registry.get(values["loss"], registry.LOSS)
    if variant.row_key is not None:
        name = variant.row_key
    elif not loss.combines_with_schemes:
        name = values["loss"]
    elif values["mod_scheme"] == registry.PLAIN_SCHEME:
        name = values["mod_scheme"]
    else:
        name = f"{values['mod_scheme']}_d{values['delta_rel']:g}"
    for method in registry.active(values):
        if method.name_suffix is not None:
            name += method.name_suffix(values)
    return f"{values['dataset']}_{name}{regime_name(values)}{arch_name(values)}"


def arch_name(values: dict) -> str:
    """The backbone in a run name: '' for the dataset's own (ResNet-50 on the real datasets), else e.g.
    ``_timm-convnext_base.fb_in22k_ft_in1k``, ``_resnet101``."""
    info = datasets.DATASET_INFO.get(values["dataset"])
    arch = values.get("arch")
    if arch is None or (info is not None and arch == info.defaults.get("arch")):
        return ""
    return "_" + arch.replace(":", "-").replace("/", "-")


_MISSING = object()


def _resolve_preset(name: str, values: dict) -> tuple[Any, bool]:
    """A registry flag that was not given: (value, whether it counts as a preset). The active modifiers' presets for
    the scheme win, then the active entries' own presets; one that the dataset's entry lacks is a clean error (never
    another entry's value). Then, for ``always_preset`` flags, any entry's; otherwise the flag's default."""
    dataset, scheme = values["dataset"], values["mod_scheme"]
    used = registry.active(values)
    found = [
        (m, m.presets_with[scheme][name])
        for m in used
        if m.kind == registry.MODIFIER and name in m.presets_with.get(scheme, {})
    ]
    found += [(m, m.presets[name]) for m in used if m.kind != registry.MODIFIER and name in m.presets]
    if found:
        m, preset = found[0]
        value = registry.for_dataset(preset, dataset, name, _MISSING)
        if value is _MISSING:
            raise ValueError(
                f"--{name} has no preset for --dataset {dataset}: {' '.join(m.selected_by)} reads it from the "
                f"dataset's entry, and datasets.DATASET_INFO[{dataset!r}].method_constants has no {name!r} under "
                f"{preset.key!r}: give --{name} on the command line, or add "
                f"{preset.key!r}: {{{name!r}: ...}} to that entry's method_constants"
            )
        return value, True
    flag = registry.flags()[name]
    if flag.always_preset:
        for m in registry.entries():
            value = registry.for_dataset(m.presets.get(name, _MISSING), dataset, name, _MISSING)
            if value is not _MISSING:
                return value, True
        return flag.default, True
    return flag.default, False


def default_exp_name(values: dict) -> str:
    """``<method name>_s<seed>_<time>-<pid>``: the process id keeps apart runs started in the same second (a sweep's
    parallel runs without --exp_name), which would otherwise share a folder and all but one be refused."""
    return f"{method_name(values)}_s{values['seed']}_{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve presets and defaults, then build (and so validate) the frozen config."""
    _ensure_current()
    values = dict(vars(args))
    values.pop("list_methods", None)
    values.pop("names", None)
    values.pop("list_archs", None)
    dataset = values["dataset"]
    info = datasets.DATASET_INFO.get(dataset)
    if info is None:
        raise ValueError(f"--dataset must be one of {', '.join(dataset_names())} (got {dataset!r})")
    if values["mod_scheme"] is None:
        values["mod_scheme"] = registry.default_scheme(values)
    for name, flag in registry.flags().items():
        if flag.nargs is not None and isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    unavailable = availability_problems(values, registry.active(values))
    if unavailable:
        raise ValueError("; ".join(unavailable))
    from_preset = []
    for name in DATASET_PRESETS:
        if values[name] is None:
            if name not in info.defaults:
                raise ValueError(
                    f"--{name} has no default for --dataset {dataset} (datasets.DATASET_INFO[{dataset!r}]"
                    f".defaults): give --{name} on the command line"
                )
            values[name] = info.defaults[name]
            from_preset.append(name)
    for name in registry.preset_flags():
        if values[name] is None:
            values[name], marked = _resolve_preset(name, values)
            if marked:
                from_preset.append(name)
    values["from_preset"] = tuple(from_preset)
    if values["num_workers"] is None:
        values["num_workers"] = _default_num_workers(info)
    if values["data_root"] is None:
        values["data_root"] = str(datasets.default_root(dataset))
    if values["exp_name"] is None:
        values["exp_name"] = default_exp_name(values)
    return Config(**values)


# ---------------------------------------------------------------------------------------------------------------------
# --list_methods


def _per_dataset(preset, flag: str) -> dict | None:
    """A ``from_dataset`` preset's values, by dataset (the datasets whose entry has one; None for a general value)."""
    if not isinstance(preset, registry.FromDataset):
        return None
    missing = object()
    values = {d: registry.for_dataset(preset, d, flag, missing) for d in datasets.DATASET_INFO}
    return {d: v for d, v in values.items() if v is not missing}


def _format_preset(preset, flag: str) -> str:
    def text(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    values = _per_dataset(preset, flag)
    if values is None:
        return f"{text(preset)} on every dataset"
    if preset.has_default:
        own = {d: v for d, v in values.items() if v != preset.default}
        general = f"{text(preset.default)} on every dataset"
        return general + "".join(f"; {d} {text(v)}" for d, v in own.items())
    return ", ".join(f"{d} {text(v)}" for d, v in values.items())


def describe_registry() -> str:
    """The datasets and the method registry, as ``--list_methods`` prints them."""
    _ensure_current()
    lines = ["Datasets (--dataset; datasets.DATASET_INFO) and their presets:"]
    for name, info in datasets.DATASET_INFO.items():
        defaults = ", ".join(f"{k} {info.defaults[k]}" for k in DATASET_PRESETS if k in info.defaults)
        lines.append(f"  {name:12s} {info.title:12s} {info.num_classes:5d} classes  {defaults}")
    lines += [
        "",
        "Methods (the registry in methods.py; docs/extending.md adds one). Per flag: its default, or its",
        "preset per dataset (used when the flag is not given):",
    ]
    for m in registry.entries():
        title = f": {m.title}" if m.title else ""
        lines.append(f"  {m.kind} {m.name}{title}; {m.summary}" if m.summary else f"  {m.kind} {m.name}{title}")
        notes = [f"selected by {' '.join(m.selected_by)}"]
        if m.kind == registry.MODIFIER:
            notes.append(f"rows {', '.join(f'{s}+{m.row}' for s in m.applies_to)}")
        elif m.row_key:
            notes.append(f"row {m.row_key}")
        if m.single_process:
            notes.append("one process only")
        notes += [f"not on {d} ({why})" for d, why in m.not_on.items()]
        lines.append(f"      {'; '.join(notes)}")
        for flag in m.flags:
            preset = m.presets.get(flag.name)
            text = _format_preset(preset, flag.name) if preset is not None else f"default {flag.default}"
            values = _per_dataset(preset, flag.name)
            missing = [d for d in datasets.DATASET_INFO if values is not None and d not in values and d not in m.not_on]
            if missing:  # a run of this entry there stops and asks for the flag (the default is only recorded)
                text += f"; {', '.join(missing)}: give --{flag.name}"
            lines.append(f"      --{flag.name}: {text}")
        for name, preset in m.presets.items():
            if name not in [f.name for f in m.flags]:
                lines.append(f"      --{name}: {_format_preset(preset, name)}")
        for scheme, per_scheme in m.presets_with.items():
            for name, preset in per_scheme.items():
                lines.append(f"      --{name} with {scheme}: {_format_preset(preset, name)}")
    return "\n".join(lines)


def table_rows(dataset: str, train_mode: str) -> list[tuple[str, bool, tuple[str, ...]]]:
    """The table's rows offered on ``dataset`` in ``train_mode`` (those whose config is valid): (row key, whether
    ``scripts/reproduce_table.sh`` runs it by default, the flags that select it)."""
    parser = get_args_parser()
    out = []
    for key, _title, flags in registry.rows():
        argv = ["--dataset", dataset, "--train_mode", train_mode, *flags, "--exp_name", "list"]
        try:
            config_from_args(parser.parse_args(argv))
        except ValueError:
            continue
        out.append((key, not registry.row_skipped_on(key, dataset), flags))
    return out


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line; any invalid value exits with argparse's usage message (status 2), never a traceback.
    ``--list_methods`` prints the registry (``--names``: the rows, machine-readable) and exits with status 0."""
    try:
        parser = get_args_parser()
    except registry.MethodError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    args = parser.parse_args(argv)
    given = flags_given(parser, sys.argv[1:] if argv is None else argv)
    repeated = [f"--{name}" for name, count in given.items() if count > 1]
    if repeated:
        parser.error(
            f"{', '.join(repeated)} given more than once: the last would silently win (the scripts' "
            "EXTRA or extra flags must not repeat one they set themselves); give each flag once"
        )
    if args.names and not args.list_methods:
        parser.error("--names goes with --list_methods")
    if args.list_archs:
        print(describe_archs(), flush=True)
        parser.exit(0)
    if args.list_methods:
        if args.names:
            rows = table_rows(args.dataset, args.train_mode)
            text = "\n".join(f"{key}\t{'table' if table else 'extra'}\t{' '.join(flags)}" for key, table, flags in rows)
        else:
            text = describe_registry()
        try:
            print(text, flush=True)
        except BrokenPipeError:  # e.g. piped into `head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit(0)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    unused = unused_flag_problems(cfg, set(given))
    if unused:
        parser.error("; ".join(unused))
    try:  # before anything is written: timm installed, the name known, the image size one the model takes
        models.check_arch(cfg.arch, cfg.image_size)
    except models.ArchError as err:
        parser.error(str(err))
    if cfg.use_pretrained and cfg.pretrained_path is not None and not Path(cfg.pretrained_path).is_file():
        parser.error(f"--pretrained_path {cfg.pretrained_path}: no such file")
    return cfg


def describe_archs() -> str:
    """What ``--arch`` takes, as ``--list_archs`` prints it."""
    installed = importlib.util.find_spec("timm") is not None
    return "\n".join(
        [
            "Architectures (--arch):",
            f"  {' '.join(RESNETS)}   torchvision's ResNets (the paper: resnet50), ImageNet weights from torchvision",
            "  smallcnn   the synthetic dataset's small CNN (its weights are made with the dataset)",
            "  timm:NAME  any timm model, e.g. timm:convnext_base.fb_in22k_ft_in1k,",
            "             timm:vit_base_patch16_224.augreg_in21k",
            "             (the name after the dot is the pretrained tag). Find names with",
            "             python -c \"import timm; print(timm.list_models('convnext*', pretrained=True))\"",
            f"             timm is {'installed' if installed else 'not installed: ' + models.TIMM_INSTALL}.",
            "Weights: downloaded (torchvision's or timm's own), or a local file with --pretrained_path;",
            "docs/backbones.md.",
        ]
    )


def flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, int]:
    """The settings (``dest``s) that ``argv`` gives, and how many times each (``--seed 1 ... --seed=5``: 2). Flags are
    named in full (the parser allows no abbreviation), so each option string is one setting."""
    dest_of = {option: action.dest for action in parser._actions for option in action.option_strings}
    given: dict[str, int] = {}
    for token in argv:
        if token == "--":
            break
        dest = dest_of.get(token.split("=", 1)[0])
        if dest is not None:
            given[dest] = given.get(dest, 0) + 1
    return given


def unused_flag_problems(cfg: Config, given: set[str]) -> list[str]:
    """Flags given on the command line that this run would ignore: a setting of a method it does not use,
    ``--delta_rel`` with the plain AN loss (recorded as 0 for it, never read), or pretrained weights that are not
    loaded. Refused, so that a run never records a setting it did not train with; accepted when the value is the one
    the run records without the flag (it changes nothing), or the one the run folder's ``config.json`` already holds
    (an unfinished run started before this check, resumed with its own command)."""
    values = cfg.to_dict()
    ignored = {name: why for name, why in ignored_settings(values).items() if name in given}
    saved = _saved_config(cfg.run_dir) if ignored else {}
    return [
        message
        for name, message in ignored.items()
        if values[name] != _value_without(name, values) and values[name] != saved.get(name, _MISSING)
    ]


def ignored_settings(values: dict) -> dict[str, str]:
    """The settings that a run of these config values records but never reads, each with why: a setting of a method
    it does not use, ``delta_rel`` with the plain AN loss, pretrained weights that are not loaded, and (in an older
    ``config.json``) a setting of a method no longer registered. ``report.py`` counts runs that differ only in these as
    one setting."""
    _ensure_current()
    fields = {f.name for f in dataclasses.fields(Config)}
    ignored = {name: f"{name} is no setting of this version" for name in values if name not in fields}
    owned = {flag.name for m in registry.active(values) for flag in m.flags}
    for name in registry.flags():
        if name not in owned:
            owners = [" ".join(m.selected_by) for m in registry.entries() if any(f.name == name for f in m.flags)]
            choice = owners[0] if len(owners) == 1 else "one of them"
            ignored[name] = (
                f"--{name} is a setting of {' or '.join(owners)}, which this run does not use: drop it, or add {choice}"
            )
    if values["mod_scheme"] == registry.PLAIN_SCHEME:
        schemes = [m.name for m in registry.entries(registry.SCHEME) if m.name != registry.PLAIN_SCHEME]
        if registry.get(values["loss"], registry.LOSS).combines_with_schemes:
            fix = f"drop it, or choose --mod_scheme {' / '.join(schemes)}"
        else:
            fix = f"--loss {values['loss']} takes no scheme: drop it"
        ignored["delta_rel"] = (
            f"--delta_rel is the large-loss schemes' rate, and this run rejects or corrects nothing: {fix}"
        )
    if not values.get("use_pretrained", True):
        ignored["pretrained_weights"] = "--pretrained_weights with --use_pretrained false loads no weights: drop one"
        ignored["pretrained_path"] = "--pretrained_path with --use_pretrained false loads no weights: drop one"
    elif values.get("pretrained_path") is not None:
        ignored["pretrained_weights"] = (
            "--pretrained_weights names torchvision's weights; --pretrained_path replaces them"
        )
    elif (arch := values.get("arch")) not in RESNETS:
        ignored["pretrained_weights"] = (
            f"--pretrained_weights names torchvision's weights for the ResNets; --arch {arch} has its own: drop it"
        )
    return ignored


def _value_without(name: str, values: dict):
    """What a run records for ``name`` when the command line does not give it."""
    if name == "pretrained_weights":
        return DEFAULT_WEIGHTS
    if name == "pretrained_path":
        return None
    if name in registry.preset_flags():
        return _resolve_preset(name, values)[0]
    return registry.flags()[name].default


def _saved_config(run_dir: Path) -> dict:
    """The run folder's config.json (lists as tuples), or {} when there is none to read."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()} if isinstance(saved, dict) else {}
