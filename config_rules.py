"""The rules a config must satisfy (``validate``: every problem as a readable sentence), and the choices and limits
they check. ``config.py`` builds the frozen config and its command line from these; the registry's entries add their
own rules (``registry.Method.validate``)."""

from __future__ import annotations

import dataclasses
import math

import datasets
import label_rules
import models
import registry


def dataset_names() -> tuple[str, ...]:
    """The datasets: the keys of ``datasets.DATASET_INFO``."""
    return tuple(datasets.DATASET_INFO)


OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("auto", "bf16", "fp32")
CACHES = ("none", "disk")
DEVICES = ("auto", "cpu", "cuda")
CUDA_GRAPHS = ("auto", "on", "off")
EVAL_RESIZES = ("workers", "device")
MAX_SEED = 2**32 - 1  # numpy's RandomState (the split and subsampling seeds) takes no more
MAX_EXP_NAME = 200  # characters; file systems allow 255 bytes per name
MAX_WORKERS = 256  # loader processes: each one a full Python process; more would exhaust a machine, not feed it
MAX_BATCH = 2**16  # images per batch: far above any GPU's memory at 448 px, and a bound on the samplers' arithmetic
# 16 pixels is the smallest input every backbone still reduces to a feature map (ResNet's stride 32 and SmallCNN's
# three poolings); 2048 is 20 times the pixels of the paper's 448 x 448, beyond what a batch of ResNet-50 activations
# fits in on today's GPUs. Outside, a run would fail later (a shape error, or a MemoryError when images are decoded).
IMAGE_SIZE_RANGE = (16, 2048)

# Float settings read in float64 only (split fractions, the rate's percentages): the float32 check does not apply.
FLOAT64_SETTINGS = frozenset({"val_frac", "ss_frac_train", "ss_frac_val", "label_proportion", "delta_rel"})
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it a value loses its digits, then is 0


def dataset_constant_problems() -> list[str]:
    """Constants in the dataset entries that no method entry reads (a typo of a method's or a flag's name)."""
    problems = []
    read = registry.constants_read()
    for dataset, info in datasets.DATASET_INFO.items():
        for key, constants in info.method_constants.items():
            unread = sorted(f"--{flag}" for flag in constants if (key, flag) not in read)
            if unread:
                readers = sorted({k for k, _ in read})
                problems.append(
                    f"datasets.DATASET_INFO[{dataset!r}].method_constants[{key!r}] holds "
                    f"{', '.join(unread)}, which no entry of the method registry reads under {key!r} "
                    f"(they read {', '.join(readers)})"
                )
    return problems


def _regime_is_default(cfg) -> bool:
    return (cfg.num_pos, cfg.num_neg, cfg.label_proportion) == (1, 0, None)


def validate(cfg) -> list[str]:
    """Every rule a config must satisfy, as readable problems (empty when valid)."""
    p = []
    choices = {"dataset": dataset_names(), "optimizer": OPTIMIZERS}
    choices.update({selector: registry.names(kind) for kind, selector in registry.SELECTOR.items()})
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            p.append(f"--{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    for name, allowed in (
        ("precision", PRECISIONS),
        ("cache", CACHES),
        ("device", DEVICES),
        ("cuda_graph", CUDA_GRAPHS),
        ("eval_resize", EVAL_RESIZES),
    ):
        if getattr(cfg, name) not in allowed:
            p.append(f"--{name} must be {', '.join(allowed[:-1])} or {allowed[-1]} (got {getattr(cfg, name)!r})")
    for field in dataclasses.fields(cfg):  # nan passes every range check written as a comparison that fails
        value = getattr(cfg, field.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            p.append(f"--{field.name} must be a finite number (got {' '.join(str(v) for v in numbers)})")
    p += _float32_problems(cfg)
    for name in ("lr", "lr_mult"):
        if not getattr(cfg, name) > 0:
            p.append(f"--{name} must be positive (got {getattr(cfg, name)})")
    for name in ("bsize", "num_epochs"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    if cfg.bsize > MAX_BATCH:
        p.append(f"--bsize must be at most {MAX_BATCH} (got {cfg.bsize})")
    arch_problem = models.arch_problem(cfg.arch)  # the name only; parse_config looks a timm name up
    if arch_problem:
        p.append(arch_problem)
    low, high = IMAGE_SIZE_RANGE
    if not low <= cfg.image_size <= high:
        p.append(
            f"--image_size must lie in [{low}, {high}] pixels (got {cfg.image_size}): below {low} the backbones "
            f"keep no feature map, and {high} is already 20 times the pixels of the paper's 448"
        )
    if not 0 < cfg.val_frac < 1:
        p.append(f"--val_frac must lie strictly between 0 and 1 (got {cfg.val_frac})")
    for name in ("ss_frac_train", "ss_frac_val"):
        if not 0 < getattr(cfg, name) <= 1:
            p.append(f"--{name} must lie in (0, 1] (got {getattr(cfg, name)})")
    for name in ("seed", "split_seed", "ss_seed"):
        if not 0 <= getattr(cfg, name) <= MAX_SEED:
            p.append(f"--{name} must lie in [0, 2**32 - 1 = {MAX_SEED}] (got {getattr(cfg, name)})")
    for name in ("save_path", "data_root", "cache_dir"):
        if getattr(cfg, name, None) == "":  # an unset shell variable: the current folder would be used silently
            p.append(f"--{name} is empty: give a folder (an unset variable in a script, perhaps)")
    if not 0 <= cfg.num_workers <= MAX_WORKERS:
        p.append(f"--num_workers must lie in [0, {MAX_WORKERS}] (got {cfg.num_workers}); by default one per core")
    if cfg.eval_resize == "device" and cfg.cache == "disk":
        p.append(
            "--eval_resize device has nothing to resize with --cache disk (the cache holds resized images): "
            "choose one of them"
        )
    p += _regime_problems(cfg)
    p += _exp_name_problems(cfg.exp_name)
    for flag in registry.flags().values():
        problem = flag.check(getattr(cfg, flag.name)) if flag.check is not None else None
        if problem:
            p.append(problem)
    if any(getattr(cfg, selector) not in registry.names(kind) for kind, selector in registry.SELECTOR.items()):
        return p  # the entries' own rules need known entries
    used = registry.active(cfg)
    p += availability_problems(cfg, used)
    loss = registry.get(cfg.loss, registry.LOSS)
    if cfg.mod_scheme != registry.PLAIN_SCHEME and not loss.combines_with_schemes:
        takers = [m.name for m in registry.entries(registry.LOSS) if m.combines_with_schemes]
        p.append(
            f"--mod_scheme {cfg.mod_scheme} modifies the AN loss; combine it with --loss {' or '.join(takers)}, "
            f"not {cfg.loss}"
        )
    for method in used:
        if method.validate is not None:
            p += method.validate(cfg)
    return p


def _float32_problems(cfg) -> list[str]:
    """Float settings that are finite in Python's float64 but not usable in the float32 that training computes in
    (the learning rates scale float32 gradients, the methods' constants enter float32 losses): ``--lr 1e39`` is inf
    there, ``--gr_q2 1e-300`` is 0. ``lr * lr_mult`` (the head's rate) too."""
    p = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        numbers = value if isinstance(value, tuple) else (value,)
        floats = [v for v in numbers if isinstance(v, float) and math.isfinite(v)]
        if field.name in FLOAT64_SETTINGS or not floats:
            continue
        shown = " ".join(f"{v:g}" for v in numbers)
        if any(abs(v) > FLOAT32_MAX for v in floats):
            p.append(
                f"--{field.name} {shown} is infinite in float32, the precision training computes in: give a "
                f"value of magnitude at most {FLOAT32_MAX:.4g}"
            )
        elif any(0 < abs(v) < FLOAT32_TINY for v in floats):
            p.append(
                f"--{field.name} {shown} is 0 (or loses its digits) in float32, the precision training computes "
                f"in: give 0 or a value of magnitude at least {FLOAT32_TINY:.4g}"
            )
    head = cfg.lr * cfg.lr_mult if math.isfinite(cfg.lr) and math.isfinite(cfg.lr_mult) else 0.0
    if not p and abs(head) > FLOAT32_MAX:
        p.append(
            f"--lr {cfg.lr:g} times --lr_mult {cfg.lr_mult:g} (the head's learning rate) is infinite in float32: "
            "lower one of them"
        )
    return p


def availability_problems(cfg, used: list) -> list[str]:
    """The active entries that are not offered on the dataset (``cfg``: a config or the parsed values)."""
    dataset = registry.value_of(cfg, "dataset")
    info = datasets.DATASET_INFO.get(dataset)
    title = info.title if info is not None else dataset
    return [
        f"{' '.join(m.selected_by)} is not available for {title}: {m.not_on[dataset]}"
        for m in used
        if dataset in m.not_on
    ]


def _regime_problems(cfg) -> list[str]:
    """The partial-label regime: ``--num_pos`` / ``--num_neg`` (the official generator's), or ``--label_proportion``."""
    p = []
    for name in ("num_pos", "num_neg"):
        if getattr(cfg, name) < 0:
            p.append(f"--{name} must be an integer >= 0 (got {getattr(cfg, name)})")
    if cfg.label_proportion is not None:
        if not 0 < cfg.label_proportion <= 1:
            p.append(f"--label_proportion must lie in (0, 1] (got {cfg.label_proportion})")
        if (cfg.num_pos, cfg.num_neg) != (1, 0):
            p.append("--label_proportion is a regime of its own: give it without --num_pos / --num_neg")
    elif cfg.num_pos == 0 and cfg.num_neg == 0:
        p.append("--num_pos 0 --num_neg 0 observes no label at all: give at least one observed label per image")
    if cfg.label_proportion is None and cfg.label_proportion_seed != label_rules.OBSERVED_SEED:
        p.append("--label_proportion_seed is the seed of --label_proportion's draw: give it with --label_proportion")
    if not _regime_is_default(cfg):  # with the full labels (the clean variant), its own rule says so
        info = datasets.DATASET_INFO.get(cfg.dataset)
        if cfg.train_set_variant == registry.OBSERVED and info is not None and info.sparse:
            p.append(
                f"{info.title} comes with its own partial labels (the annotated entries): --num_pos, "
                "--num_neg and --label_proportion, which draw observed labels from full labels, do not apply to "
                "it"
            )
    return p


def _exp_name_problems(name: str) -> list[str]:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        return [f"--exp_name must be a plain folder name, without '/' (got {name!r})"]
    if len(name) > MAX_EXP_NAME or len(name.encode("utf-8", "surrogateescape")) > 255:
        return [f"--exp_name has {len(name)} characters; it names the run folder: use at most {MAX_EXP_NAME}"]
    return []
