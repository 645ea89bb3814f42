"""Training: ``train_one_epoch`` returns a plain dict (``evaluation.evaluate`` scores a split), ``run(cfg)`` does a
whole run.

The trainer owns the training label matrix (observed labels, -1/0/1, on the device): the loader only yields images and
row indices, so LL-Cp's permanent corrections are written where every later batch reads them, whatever the workers.
Under torchrun every process runs this same code on its share of each global batch (``distributed.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import datasets
import diagnostics
import distributed
import evaluation
import files
import label_rules
import label_state
import loaders
import metrics
import models
import registry
import resize
import synthetic  # noqa: F401  registers the synthetic generator and backbone with datasets (which never imports it)
import trainstep
from config import NOT_TRAINING_SETTINGS, REPO_DIR, Config, get_args_parser, ignored_settings

EARLY_STOP_DROP = 3.0  # stop when val mAP falls more than this many points below the best so far (official rule)
CHECK_EVERY = 25  # steps between host-side checks of the running loss (and, under torchrun, of a stop request)


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what to try."""


class Interrupted(Exception):
    """SIGINT: training stopped at a safe point; the last checkpoint is consistent."""


class StopRequest:
    """Turns the first SIGINT into a request the loop honours at its next safe point; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop was requested (called at safe points)."""
        if self.requested:
            raise Interrupted

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ninterrupt: stopping at the next safe point (press Ctrl-C again to stop at once)", file=sys.stderr)

        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started with Ctrl-C ignored (`... &`): keep it so
            signal.signal(signal.SIGINT, handler)


def resolve_device(cfg: Config, ctx: distributed.Context) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device cpu.")
    return torch.device("cuda", ctx.local_rank if ctx.enabled else cfg.gpu_num)


def autocast_for(cfg: Config, device: torch.device):
    """The autocast context, chosen once: bf16 on CUDA unless --precision fp32 (or asked for on CPU), else off. The
    loss and LL's top-k selection run in fp32 whatever this is (``losses.large_loss`` casts the logits)."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_bf16)


def build_optimizer(
    cfg: Config, model: models.MultiLabelClassifier, state: label_state.LabelState | None = None
) -> torch.optim.Optimizer:
    """The official optimiser: backbone at ``lr``, head (and what the methods train, e.g. ROLE's label estimator) at
    ``lr * lr_mult``; Adam without weight decay, or SGD with momentum 0.9 and weight decay 1e-3."""
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.lr * cfg.lr_mult},
    ]
    if state is not None:
        groups += registry.extra_param_groups(cfg, state)
    return trainstep.make_optimizer(cfg, groups)


def divergence_flags(cfg: Config) -> list[str]:
    """The settings that can make this run's loss NaN or infinite: the learning rates, and the float constants of the
    loss and the modifiers in use (GR Loss's, BoostLU's alpha, EM's alpha, ...). A scheme's rate only selects
    entries, so it is not one of them."""
    names = ["lr", "lr_mult"]
    for method in registry.active(cfg):
        if method.kind != registry.SCHEME:
            names += [flag.name for flag in method.flags if flag.type is float and flag.name not in names]
    return names


def divergence_message(cfg: Config, epoch: int, step: int) -> str:
    """What a non-finite loss says: where, the settings that can cause it with their values (those given on the
    command line first), and what to do."""
    flags = {name: getattr(cfg, name) for name in divergence_flags(cfg)}
    parser = get_args_parser()  # its defaults: a value that differs and is no preset was given on the command line
    given = [n for n in flags if n not in cfg.from_preset and _as_given(flags[n]) != parser.get_default(n)]

    def shown(name: str) -> str:
        value = flags[name]
        return f"--{name} {' '.join(f'{v:g}' for v in value) if isinstance(value, tuple) else f'{value:g}'}"

    first = f"; set on the command line: {', '.join(shown(n) for n in given)}" if given else ""
    return (
        f"The training loss became NaN or infinite at epoch {epoch}, by step {step}. The settings that can cause it "
        f"in this run: {', '.join(shown(n) for n in flags)}{first}. Bring a learning rate down, or a method constant "
        "back toward its preset (python main.py --list_methods lists them), or check the data for corrupt labels; "
        "then start again under another --exp_name."
    )


def _as_given(value):
    return list(value) if isinstance(value, tuple) else value


def _periodic_check(loss_sum, epoch, step, ctx, stop: StopRequest | None, cfg: Config) -> None:
    """The periodic host check: a non-finite loss stops the run; a stop request stops it at this safe point (agreed
    by every process, so none waits for another in a collective)."""
    requested = float(bool(stop and stop.requested))
    # The flag is filled on the device (no copy from host memory) and both values come back in one read.
    flags = torch.stack([loss_sum.detach().double(), torch.full_like(loss_sum, requested, dtype=torch.float64)])
    loss, stop_flag = distributed.all_sum(flags, ctx).tolist()  # synchronises: the host waits for the device here
    if not math.isfinite(loss):
        raise TrainingError(divergence_message(cfg, epoch, step))
    if stop_flag > 0:
        raise Interrupted


def train_one_epoch(
    cfg: Config,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    state: label_state.LabelState,
    *,
    rate: float,
    epoch: int,
    device: torch.device,
    amp=contextlib.nullcontext,
    ctx: distributed.Context = distributed.SINGLE,
    stop: StopRequest | None = None,
) -> dict:
    """One pass over the training set. The label state takes LL-Cp's corrections; diagnostics are collected from the
    same forward passes when the full labels are known."""
    model.train()
    sampler: loaders.EpochBatches = loader.batch_sampler
    sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    num_selected = torch.zeros((), dtype=torch.long, device=device)
    memorisation = diagnostics.Diagnostics(device) if state.clean is not None else None
    corrects = registry.corrects_labels(cfg)  # LL-Cp: selections become permanent corrections
    num_batches = len(loader)
    flips = sampler.flips.to(device)  # the epoch's flips, copied once; indexed on the device below
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, file=sys.stderr, disable=not ctx.is_main)
    timings: dict = {}
    # Nothing in this loop reads a device value back to the host: indices arrive pinned and go to the device
    # without waiting, masks are applied arithmetically, and the only synchronisation is the periodic check.
    for step, (images, idx) in enumerate(evaluation.noting_first_batch(bar, timings), 1):
        host_rows = torch.where(idx >= 0, idx, -1 - idx)  # padding rows (a share of a tiny last batch) carry -1 - row
        idx = idx.to(device, non_blocking=True)
        real = idx >= 0
        rows = torch.where(real, idx, -1 - idx)
        flip = flips[rows]  # integer indexing on the device: the loss reads it too, nothing waits
        x = loaders.to_model_input(loaders.batch_to_device(images, device), flip)
        batch_observed = state.observed.batch(rows, host_rows)
        select = reduce = None
        if ctx.enabled:
            batch_observed = batch_observed.masked_fill(~real[:, None], 1)  # padding is never a candidate
            global_size = sampler.global_sizes[step - 1]
            select = distributed.GlobalSelection(
                ctx, global_size, rate, torch.where(real, rows, -1), distributed.share_sizes(global_size, ctx.world)
            )
            # DDP averages gradients over processes: this share of the global batch mean, times the world size
            weight = real.float()[:, None] * ctx.world / (global_size * batch_observed.shape[1])
            reduce = lambda matrix, w=weight: (matrix * w).sum()  # noqa: E731
        with amp():
            logits = model(x)
        loss, selected = registry.compute_loss(
            cfg, logits, batch_observed, rows, rate, state, select=select, reduce=reduce, epoch=epoch, flip=flip
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if select is not None and select.global_selected is not None:  # the whole global batch, on every process
            keep = select.global_rows >= 0
            corrected_rows, corrected, corrected_real = select.global_rows, select.global_selected & keep[:, None], keep
        else:
            corrected_rows, corrected, corrected_real = rows, selected, None
        if corrects:  # permanent correction: later epochs see these entries as observed positives
            state.observed.correct(corrected_rows, corrected, corrected_real)
        if memorisation is not None:
            memorisation.update(logits, state.initial[rows], state.clean[rows], selected, real if ctx.enabled else None)
        loss_sum += loss.detach() / ctx.world
        num_selected += corrected.sum()
        if step % CHECK_EVERY == 0 or step == num_batches:
            _periodic_check(loss_sum, epoch, step, ctx, stop, cfg)  # synchronises: the loop's one host read-back
    state.observed.end_epoch()
    loss_sum = distributed.all_sum(loss_sum, ctx)
    stats = {"train_loss": float(loss_sum) / max(num_batches, 1), "num_selected": int(num_selected)}
    stats["train_first_batch_seconds"] = round(timings.get("first_batch_seconds", 0.0), 3)
    if memorisation is not None:
        distributed.all_sum(memorisation.sums, ctx)
        stats.update(memorisation.summary())
        if corrects:
            stats.update(diagnostics.corrected_labels_summary(state))
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Building a run.


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_header(cfg: Config, run_dir: Path, device: torch.device, ctx: distributed.Context) -> None:
    processes = f"  processes {ctx.world}" if ctx.enabled else ""
    print(f"git {git_sha()}  torch {torch.__version__}  device {device}{processes}  run folder {run_dir}")
    values = cfg.to_dict()
    unused = ignored_settings(values)  # other methods' settings: one line, not one each
    for key, value in sorted(values.items()):
        if key != "from_preset" and key not in unused:
            print(f"  {key:18s} {value}{'   (preset)' if key in cfg.from_preset else ''}")
    if unused:
        names = f"recorded in config.json, not used by this run: {', '.join(sorted(unused))}"
        print(textwrap.fill(names, 120, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False))


def build_model(cfg: Config, num_classes: int) -> models.MultiLabelClassifier:
    """The model, with the pretrained ``smallcnn`` backbone the dataset's entry makes (the synthetic one's) and the
    options the active methods set (BoostLU's CAM-form head)."""
    smallcnn_weights = None
    make_weights = datasets.DATASET_INFO[cfg.dataset].smallcnn_weights
    if cfg.arch == "smallcnn" and cfg.use_pretrained and make_weights is not None:
        smallcnn_weights = make_weights(cfg.data_root)
    return models.build_model(
        cfg.arch,
        num_classes,
        use_pretrained=cfg.use_pretrained,
        weights_name=cfg.pretrained_weights,
        smallcnn_weights=smallcnn_weights,
        image_size=cfg.image_size,
        pretrained_path=cfg.pretrained_path,
        **registry.model_options(cfg),
    )


def _scores_map(scores: torch.Tensor, labels) -> float:
    return float(100.0 * evaluation.ap_against(scores, labels).nanmean())


def build_loaders(cfg: Config, data: datasets.Data, device: torch.device, ctx: distributed.Context) -> dict:
    """train (shuffled, flipped; each process its share of every global batch), and val and test (each process a
    contiguous share of the rows), all from one pool of workers. With ``--cache disk`` each reads its split's disk
    cache (built by the first process). EM+APL also gets the training images in row order."""
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if registry.needs_train_scores(cfg):
        splits["train_rows"] = data.train
    parts = {}
    for name, split in splits.items():
        cache = None
        if cfg.cache == "disk":
            cache = loaders.disk_cache_path(split, cfg.image_size, datasets.derived_dir(cfg))
            if ctx.is_main:
                loaders.build_disk_cache(split, cfg.image_size, cache, cfg.num_workers or 1)
        if name != "train":
            split = split.share(ctx.rank, ctx.world)
        parts[name] = (split, name == "train", cache)
    split_loaders = loaders.make_loaders(
        parts, cfg, pin_memory=device.type == "cuda", ctx=ctx, eval_resize=cfg.eval_resize
    )
    if cfg.eval_resize == "device":
        order = resize.checked_pass_order()
        checked = 0
        for name in ("val", "test"):  # the first 64 images of each scored split
            split = parts[name][0]
            paths = [split.image_path(row) for row in range(min(64, len(split)))]
            checked += loaders.check_device_resize(paths, cfg.image_size, device, order)
        if ctx.is_main:
            print(
                f"--eval_resize device: val and test images resized on {device.type} with PIL's arithmetic (the "
                f"installed Pillow's pass order: {order}; the same pixels as PIL on {checked} of them)"
            )
    distributed.barrier(ctx)
    return split_loaders


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # the last finished end-to-end epoch
    best_val_map: float = -1.0
    best_epoch: int = 0
    early_stopped: bool = False
    log_lines: int = 0  # lines of log.jsonl written up to this point


def checkpoint_payload(
    cfg, model, optimizer, state: label_state.LabelState, progress: Progress, log: list[str] | None = None
) -> dict:
    """What a checkpoint holds; ``log``: the log.jsonl lines it covers, from which a lost or cut log is rebuilt."""
    payload = {
        "progress": asdict(progress),
        "log": list(log) if log is not None else [],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "labels": state.checkpoint(),
        "rng": {"torch": torch.get_rng_state()},
        "config": cfg.to_dict(),
    }
    if torch.cuda.is_available():
        payload["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    return payload


def restore(payload: dict, model, optimizer, state: label_state.LabelState) -> Progress:
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    state.restore(payload["labels"])
    torch.set_rng_state(payload["rng"]["torch"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return Progress(**payload["progress"])


# ---------------------------------------------------------------------------------------------------------------------
# A whole run.


def run(cfg: Config) -> dict:
    """Train with the configured method, keep the best-val weights, score them on test; returns ``final.json``.

    Resumes an unfinished run of the same config from its last checkpoint (``--resume`` insists that there is one);
    a finished run is not run again.
    """
    ctx = distributed.setup(use_cuda=cfg.device != "cpu" and torch.cuda.is_available())
    try:
        try:
            final = _run(cfg, ctx)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise disk_full_error(err) from None
        distributed.finish(ctx)
        return final
    finally:
        distributed.teardown()


@dataclass
class Session:
    """What one run works with, built once by ``_run``: the loop, LinearInit and the checkpoints read it from here."""

    cfg: Config
    ctx: distributed.Context
    device: torch.device
    data: datasets.Data
    folder: checkpoint.RunFolder
    model: models.MultiLabelClassifier  # its state_dict is what gets saved
    state: label_state.LabelState
    loaders: dict
    amp: object
    progress: Progress = field(default_factory=Progress)
    stop: StopRequest = field(default_factory=StopRequest)
    forward: torch.nn.Module | None = None  # what the loop calls: the model, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer | None = None
    log_lines: list[str] = field(default_factory=list)  # log.jsonl's lines so far; each checkpoint carries them
    progress_saved: int = 0  # the epoch of the last checkpoint on disk

    def log(self, record: dict) -> None:
        """Add an epoch's line to log.jsonl (first process) and print it. The file is written whole from the lines
        kept here (atomically): a line never lands on a cut one, and a full disk leaves the previous file."""
        self.progress.log_lines += 1
        self.log_lines.append(json.dumps(record) + "\n")
        if not self.ctx.is_main:
            return
        _save(checkpoint.write_log, self.folder.log, self.log_lines, kept=self.kept())
        extra = f"  selected {record['num_selected']:6d}" if "num_selected" in record else ""
        print(
            f"{record['phase']:10s} epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}{extra}"
            f"  val mAP {record['val_map']:6.2f}"
        )

    def kept(self) -> str:
        """What the run folder keeps when a write fails: the last checkpoint's epoch, for the message."""
        saved = self.progress_saved
        return f"the checkpoint of epoch {saved}" if saved else "no checkpoint yet (the run starts over)"


def _run(cfg: Config, ctx: distributed.Context) -> dict:
    started = time.time()
    device = resolve_device(cfg, ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    reason = registry.single_process_reason(cfg)
    if ctx.enabled and reason:
        raise TrainingError(reason)
    reason = cuda_graph_refusal(cfg, device, ctx)
    if cfg.cuda_graph == "on" and reason:  # before anything is written
        raise TrainingError(reason + "; use --cuda_graph auto or off.")
    if ctx.enabled:  # one run folder for all processes, whatever second each one built its default name in
        cfg = dataclasses.replace(cfg, exp_name=distributed.broadcast_object(cfg.exp_name, ctx))
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    data = _main_first(ctx, device, lambda: datasets.build_data(cfg))  # a data error leaves no run folder behind
    check_last_batch(cfg, data, ctx)
    fingerprint = data_fingerprint(data)
    folder = _main_first(
        ctx,
        device,
        lambda: checkpoint.open_run_folder(
            cfg, resume=cfg.resume, not_training=NOT_TRAINING_SETTINGS, data_fingerprint=fingerprint, lock=ctx.is_main
        ),
    )
    try:
        return _run_in_folder(cfg, ctx, device, data, folder, started)
    finally:
        folder.release()  # the run folder's lock


def data_fingerprint(data: datasets.Data) -> str:
    """A digest of what the run trains and is scored on: every split's image names, full and observed labels. A
    resume on other formatted data is refused (``checkpoint.open_run_folder``)."""
    digest = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        for part in (split.image_names, split.labels, split.observed):
            arrays = [getattr(part, p) for p in part._PARTS] if isinstance(part, label_rules.SparseLabels) else [part]
            for array in arrays:
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _run_in_folder(cfg: Config, ctx, device, data: datasets.Data, folder: checkpoint.RunFolder, started: float) -> dict:
    if folder.finished is not None:
        if ctx.is_main:
            print(f"{folder.path} holds a finished run (test mAP {folder.finished['test_map']:.2f}); nothing to do.")
        return folder.finished
    if ctx.is_main:
        print_header(cfg, folder.path, device, ctx)
        print(f"images: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    torch.manual_seed(cfg.seed)
    model = _main_first(ctx, device, lambda: build_model(cfg, data.num_classes))
    model = model.to(device, memory_format=torch.channels_last)
    state = registry.build_label_state(cfg, data.train, device)
    s = Session(
        cfg, ctx, device, data, folder, model, state, build_loaders(cfg, data, device, ctx), autocast_for(cfg, device)
    )
    s.stop.install()
    try:
        _prepare_and_train(s)
    except Interrupted:
        where = f"the checkpoint of epoch {s.progress.epoch}" if s.progress.epoch else "no checkpoint yet"
        raise Interrupted(
            f"Interrupted. {folder.path} holds {where}, which is consistent: run the same command (with --exp_name "
            f"{cfg.exp_name}) again to resume{' from it' if s.progress.epoch else ' (it starts over)'}."
        ) from None
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    test = test_best_model(s)
    return write_final(test, s, time.time() - started)


def _prepare_and_train(s: Session) -> None:
    """LinearInit's first phase or the resumed state, then the end-to-end epochs."""
    if s.folder.resume_from is None and registry.before_training_hooks(s.cfg):
        if s.ctx.is_main and s.folder.log.exists():
            _save(checkpoint.write_log, s.folder.log, [], kept=s.kept())  # an unfinished first phase runs again
        registry.before_training(s, lambda scores: _scores_map(scores, evaluation.eval_labels(s.data.val, s.device)))
    s.optimizer = build_optimizer(s.cfg, s.model, s.state)
    if s.folder.resume_from is not None:
        s.progress = restore(s.folder.resume_from, s.model, s.optimizer, s.state)
        s.log_lines, s.progress_saved = list(s.folder.logged), s.progress.epoch
        if s.ctx.is_main:
            if s.folder.log_note:
                print(s.folder.log_note)
            print(f"resuming after epoch {s.progress.epoch} from {s.folder.resume_file}")
    if s.ctx.is_main and (s.log_lines or s.folder.log.exists()):  # drops the lines of epochs that will run again
        _save(checkpoint.write_log, s.folder.log, s.log_lines, kept=s.kept())
    s.forward = wrap_model(s.cfg, s.model, s.device, s.ctx)
    _train_epochs(s)


def test_best_model(s: Session) -> dict:
    """Load the best-val weights into the model and score them on the test split."""
    best = checkpoint.load_best_model(s.folder.path / "bestmodel.pt", s.progress.best_epoch, map_location=s.device)
    s.model.load_state_dict(best["model"])
    labels = evaluation.eval_labels(s.data.test, s.device)
    start = time.time()
    test = evaluation.evaluate(
        s.forward, s.loaders["test"], labels, s.device, "test", s.data.class_groups, s.amp, s.ctx, True
    )
    test["seconds"] = time.time() - start
    return test


def write_final(test: dict, s: Session, seconds: float) -> dict:
    """``final.json`` (the first process writes it), and the closing line."""
    progress = s.progress
    final = {
        "best_epoch": progress.best_epoch,
        "val_map": progress.best_val_map,
        "test_map": test["map"],
        "test_ap_per_class": test["ap_per_class"],
        "test_metrics": test["metrics"],
        **({"test_group_map": test["group_map"]} if "group_map" in test else {}),
        "test_images": test["images"],
        "train_images": len(s.data.train),
        "val_images": len(s.data.val),
        "epochs_run": progress.epoch,
        "early_stopped": progress.early_stopped,
        "processes": s.ctx.world,
        "seconds": round(seconds, 1),
        "test_seconds": round(test["seconds"], 3),
        "test_first_batch_seconds": round(test["first_batch_seconds"], 3),
    }
    if isinstance(s.forward, trainstep.FastTrainStep):
        final["fast_step"] = s.forward.what
        if s.forward.warmup_s is not None:
            final["fast_step_warmup_s"] = round(s.forward.warmup_s, 1)
    if s.ctx.enabled:
        final["label_state_identical_on_all_processes"] = label_state.same_on_all_processes(s.state, s.ctx)
    if s.ctx.is_main:
        kept = "every checkpoint and bestmodel.pt"
        _save(
            files.write_text_atomic,
            s.folder.path / "final.json",
            json.dumps(final, indent=2) + "\n",
            kept=kept,
            then="score the best weights on test again",
        )
        groups = "".join(f", {g} {'-' if m is None else f'{m:.2f}'}" for g, m in test.get("group_map", {}).items())
        print(
            f"test mAP {test['map']:.2f}{groups} (best val mAP {progress.best_val_map:.2f} at epoch "
            f"{progress.best_epoch}); {s.folder.path}"
        )
        print(
            "  at 0.5: "
            + ", ".join(f"{k} {test['metrics'][k]:.1f}" for k in metrics.THRESHOLD_METRICS)
            + "; top-3: "
            + ", ".join(f"{k} {test['metrics'][k + '_top3']:.1f}" for k in metrics.THRESHOLD_METRICS)
        )
    return final


def _main_first(ctx: distributed.Context, device: torch.device, make):
    """Run ``make`` on the first process, then on the others: shared files (formatted data, caches, downloaded
    weights, the run folder) are created once, and the others find them. If it fails on the first process, every
    process stops (with the first process's message there) instead of waiting for it."""
    if not ctx.enabled:
        return make()
    error = None
    if ctx.is_main:
        try:
            result = make()
        except Exception as err:  # re-raised below, after telling the others
            error = err
    if distributed.broadcast(1.0 if error else 0.0, ctx, device):
        raise error if error is not None else TrainingError("The first process stopped with an error (see above).")
    return result if ctx.is_main else make()


def cuda_graph_refusal(cfg: Config, device: torch.device, ctx: distributed.Context) -> str | None:
    """Why this run's training step cannot be replayed as a CUDA graph: the device, torchrun, or a method that needs
    the eager forward (None: it can)."""
    return trainstep.cuda_graph_reason(device, ctx.enabled) or registry.eager_forward_reason(cfg)


def wrap_model(cfg: Config, model: torch.nn.Module, device: torch.device, ctx: distributed.Context):
    """What the loop calls: the model, as DistributedDataParallel under torchrun (SyncBatchNorm on CUDA with
    --sync_bn), and for full training batches compiled (--compile) and/or replayed as a CUDA graph (--cuda_graph; auto:
    on a single CUDA device, compiled or not), see ``trainstep.py``. Parameters stay shared with ``model``, whose
    state_dict is what gets saved."""
    forward = model
    if ctx.enabled:
        if device.type == "cuda" and cfg.sync_bn:
            forward = models.convert_sync_batchnorm(forward)  # timm's BatchNorm+activation layers kept whole
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    reason = cuda_graph_refusal(cfg, device, ctx)  # "on" where it cannot run was refused in _run
    # With --compile too: compiled kernels are still launched one by one from Python, and the graph removes exactly
    # that cost (torch's own "reduce-overhead" mode is the same pairing); a capture that fails under auto falls back.
    graph = reason is None and cfg.cuda_graph != "off"
    if not (cfg.compile or graph):
        return forward
    full_share = distributed.share_sizes(cfg.bsize, ctx.world)[ctx.rank] if ctx.enabled else cfg.bsize
    return trainstep.FastTrainStep(
        forward, full_share, compile=cfg.compile, cuda_graph=graph, required=cfg.cuda_graph == "on", verbose=ctx.is_main
    )


def _train_epochs(s: Session) -> None:
    """The end-to-end epochs from ``progress.epoch + 1``: train, (APL), validate, log, keep the best, checkpoint."""
    cfg, progress, device = s.cfg, s.progress, s.device
    val_labels = evaluation.eval_labels(s.data.val, device)
    while progress.epoch < cfg.num_epochs and not progress.early_stopped:
        epoch = progress.epoch + 1
        epoch_start = time.time()
        rate = registry.modification_rate(cfg, epoch)
        positives_at_start = s.state.observed.num_positive()
        stats = train_one_epoch(
            cfg,
            s.forward,
            s.loaders["train"],
            s.optimizer,
            s.state,
            rate=rate,
            epoch=epoch,
            device=device,
            amp=s.amp,
            ctx=s.ctx,
            stop=s.stop,
        )
        train_seconds = time.time() - epoch_start  # train_one_epoch has read its loss back: the GPU is done

        # The methods' per-epoch hooks (EM+APL's pseudo-labelling), with the training images' scores if they ask.
        def train_scores(desc=f"epoch {epoch} APL"):  # the loader exists only for methods that ask for scores
            return evaluation.predict(s.forward, s.loaders["train_rows"], device, desc, s.amp, s.ctx)

        stats.update(registry.after_epoch(cfg, s.state, epoch, train_scores))
        val_start = time.time()
        val = evaluation.evaluate(
            s.forward, s.loaders["val"], val_labels, device, f"epoch {epoch} val", amp=s.amp, ctx=s.ctx
        )
        val_seconds, val_map = time.time() - val_start, val["map"]
        record = {"phase": "end_to_end", "epoch": epoch, "rate": rate, **stats}
        record.update(observed_positives=positives_at_start, val_map=val_map)
        if not s.folder.path.is_dir():
            raise TrainingError(
                f"The run folder {s.folder.path} was deleted or moved while the run was training: nothing more can be "
                "saved there. Run the same command again to start the run over."
            )
        record["seconds"] = round(time.time() - epoch_start, 3)
        record.update(train_seconds=round(train_seconds, 3), val_seconds=round(val_seconds, 3))
        record["val_first_batch_seconds"] = round(val["first_batch_seconds"], 3)
        s.log(record)
        progress.epoch = epoch
        # Order matters for resume: the best weights are on disk before a checkpoint that points at them.
        if val_map > progress.best_val_map:
            progress.best_val_map, progress.best_epoch = val_map, epoch
            if s.ctx.is_main:
                _save(
                    files.save_torch_atomic,
                    best_model_payload(s, epoch, val_map),
                    s.folder.path / "bestmodel.pt",
                    kept=s.kept() + " and the bestmodel.pt it points at",
                )
        elif progress.best_val_map - val_map > EARLY_STOP_DROP:
            if s.ctx.is_main:
                print(
                    f"early stop: val mAP {val_map:.2f} fell more than {EARLY_STOP_DROP:g} below "
                    f"{progress.best_val_map:.2f}"
                )
            progress.early_stopped = True
        if s.ctx.is_main:
            payload = checkpoint_payload(cfg, s.model, s.optimizer, s.state, progress, log=s.log_lines)
            _save(checkpoint.save_checkpoint, payload, s.folder.path, kept=s.kept())
        s.progress_saved = epoch
        distributed.barrier(s.ctx)
        s.stop.check()


def best_model_payload(s: Session, epoch: int, val_map: float) -> dict:
    best = {"model": s.model.state_dict(), "epoch": epoch, "val_map": val_map, "config": s.cfg.to_dict()}
    best.update(registry.best_model_extras(s.cfg, s.state))
    return best


def check_last_batch(cfg: Config, data: datasets.Data, ctx: distributed.Context) -> None:
    """A training batch (or a process's share of one) of a single image cannot pass BatchNorm in training mode when
    the feature maps have shrunk to one value per channel (small images): the official code stops there with
    PyTorch's "Expected more than 1 value per channel". When the last batch has one image, try it once on a
    throwaway model of the same architecture, before the run folder is made, and say what to do."""
    num_train = len(data.train)
    last = num_train % cfg.bsize or cfg.bsize
    shares = distributed.share_sizes(last, ctx.world) if ctx.enabled else [last]
    if 1 not in shares:
        return
    probe = models.build_model(cfg.arch, data.num_classes, use_pretrained=False, image_size=cfg.image_size).train()
    try:
        with torch.no_grad():
            probe(torch.zeros((1, 3, cfg.image_size, cfg.image_size)))
    except ValueError as err:
        raise TrainingError(
            f"--bsize {cfg.bsize} leaves a last training batch of one image ({num_train} training images"
            f"{', shared among ' + str(ctx.world) + ' processes' if ctx.enabled else ''}), and BatchNorm cannot "
            f"normalise one image at --image_size {cfg.image_size} ({err}). Choose another --bsize (e.g. "
            f"{cfg.bsize + 1}) or --ss_frac_train."
        ) from None


def _save(write, *args, kept: str, then: str = "resume from it") -> None:
    """``write(*args)``; a file that cannot be written (a full disk) stops the run with one message: what could not
    be written, what the run folder keeps (``kept``), and that the same command goes on once there is space."""
    try:
        write(*args)
    except OSError as err:
        fix = "free some space" if err.errno == errno.ENOSPC else "fix that"
        raise TrainingError(
            f"{err.strerror or err}. The run folder keeps {kept}, intact: {fix} and run the same command again to "
            f"{then}."
        ) from None


def disk_full_error(err: OSError) -> TrainingError:
    """A full disk outside the run folder's own writes (formatted data, observed labels, caches): one message."""
    where = getattr(err, "path", None) or err.filename
    return TrainingError(
        f"The disk is full: could not write {where or 'a file'} ({err.strerror or err}). Every file written so far is "
        "complete (files are replaced whole, never half-written): free some space there and run the same command "
        "again to continue; an unfinished run resumes from its last checkpoint."
    )
