"""The prepared GPU check: the paper's COCO setting at the GPU's limit, measured with ``main.py`` itself.

    bash bench/gpu_check.sh                      # on the GPU machine: system python3, no venv, no network; < 6 min
    bash bench/gpu_check.sh --arch resnet101     # another backbone, built as main.py builds it (default resnet50)
    GPU_CHECK_SMALL=1 bash bench/gpu_check.sh    # the same steps, tiny, on a CPU (a test runs it)

Steps, all in one process tree on one machine, so every ratio compares numbers measured together:
1. ``roof``: the model alone, eager (ResNet-50, 448x448, batch 16, bf16 autocast, channels-last, main.py's Adam (fused
   on CUDA) and ``losses.large_loss``; evaluation at batch 64), batches already on the GPU; ``train_graph_img_s``: the
   same step with the forward and backward replayed as a CUDA graph (``trainstep.FastTrainStep``), the GPU's own limit
   when the eager step is bound by the host's kernel launches, measured at the end (after every step that starts worker
   processes: a child forked after a capture aborts when it frees captured memory). ``graph_check`` (GPU only): 12
   steps from the same weights on the same batches, two eager copies against each other, eager against the graph
   and eager against eager with foreach Adam: the first step's logits, and the parameters and BatchNorm statistics at
   the end (see ``graph_check``).
   ``*_fed_img_s``: the same steps fed from pinned host memory each step, the copy on a side stream (as main.py runs,
   ``loaders.batch_to_device``), and ``*_fed_same_stream_img_s`` on the current stream, for the price of the copy
   and what the side stream takes off it (``ratios.*_copy_side_stream_vs_same``). ``*_fused_adam_img_s``: the step
   with ``torch.optim.Adam(fused=True)`` (one kernel for all parameters; main.py's on CUDA since two checks measured
   1.03x), timed in turn with ``*_foreach_adam_img_s`` (torch's default implementation; ``ratios.*_vs_foreach``).
2. ``official_style``: the released code's data path and precision (PIL transforms per item in 4 workers, fp32, NCHW)
   training the same model (``bench/throughput.py``), and its evaluation, with the official code's ``cudnn.benchmark``
   (off), timed as main.py's rates are read: after a full warm-up pass, over full batches only (its smaller last batch
   is dropped; ``throughput.measure`` refuses a batch of another size inside a timed window).
3. a generated COCO-2014 tree (``train2014``, ``val2014`` and ``annotations/instances_*2014.json``; 640x480 JPEGs),
   formatted by ``main.py`` on first use as any real COCO folder;
   ``data_path``: this project's loader alone over the test images (decode in one worker per core, pinned memory),
   whether its batches reach the device channels-last, as the workers lay them out, and ``predict_img_s``: the same
   loader through main.py's scoring loop (``evaluation.predict``) with the model, outside main.py. The same two with
   ``--eval_resize device`` (workers only decode; ``device_resize_img_s``, ``predict_device_resize_img_s``; the
   resize alone on a batch already on the device, its cost in device time: ``device_resize_only_img_s``), whether
   that gives the workers' pixels on this device (``device_resize_same_pixels``, every test image) and the installed
   Pillow's ``pass_order``.
4. ``main_py``: ``python main.py --dataset coco --mod_scheme LL-R`` on it (no pretrained weights: no network there),
   as a user runs it (on one GPU the training step is a CUDA graph), rates from the epochs after the first
   (``log.jsonl``'s ``train_seconds`` and ``val_seconds``; ``final.json``'s ``test_seconds``); ``main_py_eager``: the
   same with ``--cuda_graph off`` and ``--eval_resize device`` (evaluation runs eagerly in every run, so its
   evaluation rate is main.py's with the device resize; without it when the data path's device resize failed
   (``device_resize_error``) or gave other pixels: ``eval_resize`` says which); ``main_py_compile``: with
   ``--compile`` (on a GPU compiled and replayed as a CUDA graph, ``fast_step`` says which; ``warmup_s``: the first
   fast step, from ``final.json``; it gets what is left of ``BUDGET_S`` after the end phase, at most 200 s, and is
   left out with under 60 s; a failure, or a run out of time, is recorded as its ``error`` and the check goes on).
5. ``ratios`` and ``coco_run_minutes``: the paper's COCO run (10 epochs of 65,665 train + 16,416 val images, then
   40,137 test images) at the measured rates; ``project_fill_per_pass``: the same with each pass's fill (its first
   batch's wait: main.py logs ``*_first_batch_seconds``) paid once per COCO pass, at the passes' steady rates
   (``main_py.train_steady_img_s``, ``eval_steady_img_s``), instead of once per the check's 16 to 40 times shorter
   pass (and ``ratios.*_steady_*`` with the fill left out); ``project_device_resize`` and
   ``project_compile_device_resize``: the default and the compiled run's training with the device-resize
   evaluation.
Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import throughput  # noqa: E402

import datasets  # noqa: E402
import evaluation  # noqa: E402
import loaders  # noqa: E402
import losses  # noqa: E402
import resize  # noqa: E402
import trainstep  # noqa: E402

COCO = throughput.COCO
SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"
SKIP_COMPILE = os.environ.get("GPU_CHECK_SKIP_COMPILE") == "1"  # leaves out the --compile run (about 100 s on a GPU)
# Full: the paper's model and image size on 5,000 + 1,000 COCO-sized JPEGs (4,000 train, 1,000 val, 1,000 test).
# Small: a tiny model and images, so the same steps run on a CPU in a minute or two.
SETTINGS = (
    {"arch": "smallcnn", "size": 32, "jpeg": (64, 48), "train2014": 60, "val2014": 16, "epochs": 2, "batches": 3,
     "warmup": 1}
    if SMALL
    else {"arch": "resnet50", "size": 448, "jpeg": (640, 480), "train2014": 5000, "val2014": 1000, "epochs": 3,
          "batches": 100, "warmup": 15}
)  # fmt: skip
BSIZE = 16
NUM_CLASSES = 80
# The GPU machine runs the check as one command of at most 6 minutes: the optional --compile run gets what is left of
# BUDGET_S once the end phase (END_S: the roof again with the candidates, and the graph check; about 45 s estimated
# from run 3's rates) is set aside, at most COMPILE_S, and is left out when under MIN_COMPILE_S remain (its
# compilation alone took about 50 s).
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", 600 if SMALL else 350))
END_S, COMPILE_S, MIN_COMPILE_S = 45.0, 200.0, 60.0


def log(message: str, out: dict | None = None) -> None:
    """Progress on stderr; with GPU_CHECK_PARTIAL=<file>, the results so far are written there too (a check cut
    short still leaves them)."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
    if out is not None and os.environ.get("GPU_CHECK_PARTIAL"):
        Path(os.environ["GPU_CHECK_PARTIAL"]).write_text(json.dumps(rounded(out)) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------------
# 1. The roof: the model alone.


def roof(device: torch.device, graph: bool, candidates: bool = False) -> dict:
    """Eager training and evaluation rates of the model alone on batches already on the device, and (``graph``) the
    training rate with the forward and backward replayed as a CUDA graph. A process must not fork after a capture (a
    child that frees a captured tensor aborts), so the graphed measurements come after every step that starts
    workers. ``candidates``: also the side-stream copies and fused Adam against their baselines (``alternated``;
    once per check, with the graph on a GPU: main.py's step)."""
    model, optimizer, amp, images, observed = roof_model(device)
    x = loaders.to_model_input(images)
    host = images.cpu().pin_memory() if device.type == "cuda" else images.clone()

    def fed() -> torch.Tensor:  # the batch copied from pinned host memory each step, as main.py's loop gets it
        return loaders.to_model_input(loaders.batch_to_device(host, device))

    def train_step(forward=model, inputs=lambda: x, adam=optimizer) -> None:
        with amp:
            logits = forward(inputs())
        loss, _ = losses.large_loss(logits, observed, "LL-R", 0.004)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    eval_x = loaders.to_model_input(images.repeat(loaders.EVAL_BATCH_FACTOR, 1, 1, 1))

    @torch.inference_mode()
    def eval_step(inputs=lambda: eval_x) -> None:
        with amp:
            torch.sigmoid(model(inputs()).float())

    def eval_fed() -> torch.Tensor:  # evaluation.predict's model batch: loader batches copied one by one, then joined
        return loaders.to_model_input(
            torch.cat([loaders.batch_to_device(host, device) for _ in range(loaders.EVAL_BATCH_FACTOR)])
        )

    model.train()
    result = {"train_img_s": timed(train_step, device, BSIZE)}
    if graph:
        graphed = trainstep.FastTrainStep(model, BSIZE, compile=False, cuda_graph=True, required=True, verbose=False)
        graphed.train()
        try:
            result["train_graph_img_s"] = timed(lambda: train_step(graphed), device, BSIZE)
            if candidates:  # fused_adam_rates records its own failure
                result.update(copy_stream_rates("train_graph", lambda: train_step(graphed, fed), device, BSIZE))
                result.update(fused_adam_rates("train_graph", lambda a: train_step(graphed, adam=a), model, device))
        except RuntimeError as err:  # reported, so that the rest of the check still runs
            result["train_graph_error"] = str(err).splitlines()[0][:300]
    elif candidates:
        result.update(copy_stream_rates("train", lambda: train_step(inputs=fed), device, BSIZE))
        result.update(fused_adam_rates("train", lambda adam: train_step(adam=adam), model, device))
    model.eval()
    result["eval_img_s"] = timed(eval_step, device, eval_x.shape[0])
    if candidates:
        result.update(copy_stream_rates("eval", lambda: eval_step(eval_fed), device, eval_x.shape[0]))
    return result


def alternated(variants: dict, device: torch.device, batch_size: int) -> dict:
    """A candidate and its baseline measured beside each other: each of ``variants`` (key -> step) timed in turn,
    twice, over half the usual batches; the faster of each kept."""
    rates = dict.fromkeys(variants, 0.0)
    for _ in range(2):
        for key, step in variants.items():
            rates[key] = max(rates[key], timed(step, device, batch_size, max(SETTINGS["batches"] // 2, 1)))
    return rates


def copy_stream_rates(name: str, step, device: torch.device, batch_size: int) -> dict:
    """``step`` fed from pinned host memory, its copies on a side stream (``loaders.batch_to_device``, as main.py
    runs) and on the current stream (the baseline), ``alternated``."""
    previous = loaders.SIDE_STREAM_COPIES

    def copies_on(side: bool):
        def run() -> None:
            loaders.SIDE_STREAM_COPIES = side
            step()

        return run

    try:
        variants = {f"{name}_fed_img_s": copies_on(True), f"{name}_fed_same_stream_img_s": copies_on(False)}
        return alternated(variants, device, batch_size)
    finally:
        loaders.SIDE_STREAM_COPIES = previous


def fused_adam_rates(name: str, step, model: torch.nn.Module, device: torch.device) -> dict:
    """``step(adam)`` with torch's foreach Adam (its default, and main.py's before it chose the fused one on CUDA)
    and with ``fused=True`` (one kernel for every parameter; rounds differently), each with its own state,
    ``alternated``. A failure is recorded as ``<name>_fused_adam_error``."""
    foreach = torch.optim.Adam(model.parameters(), lr=1e-5, foreach=True)
    try:
        fused = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
        variants = {
            f"{name}_foreach_adam_img_s": lambda: step(foreach),
            f"{name}_fused_adam_img_s": lambda: step(fused),
        }
        return alternated(variants, device, BSIZE)
    except Exception as err:  # recorded, so that the rest of the check still runs
        return {f"{name}_fused_adam_error": error_line(err)}


def error_line(err: Exception) -> str:
    """An exception as one line of the JSON: its type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def roof_model(device: torch.device, seed: int = 0, foreach: bool = False):
    torch.manual_seed(seed)
    model = throughput.build_model(SETTINGS["arch"], NUM_CLASSES).to(device, memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # main.py's optimiser (fused Adam on CUDA, trainstep.fused_adam); ``foreach``: torch's foreach Adam instead
    if foreach:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, foreach=True)
    else:
        adam = SimpleNamespace(optimizer="adam", lr=1e-5)
        optimizer = trainstep.make_optimizer(adam, [{"params": model.parameters()}])
    size = SETTINGS["size"]
    images = torch.randint(0, 256, (BSIZE, 3, size, size), dtype=torch.uint8, device=device)
    observed = (torch.rand(BSIZE, NUM_CLASSES, device=device) < 0.05).to(torch.int8)
    return model, optimizer, amp, images, observed


def graph_check(device: torch.device, steps: int = 12) -> dict:
    """How far a CUDA-graph run drifts from an eager one: ``steps`` training steps from the same weights on the same
    batches, for two eager copies (cuDNN's own run-to-run variation), for eager against the graph, and for eager
    against eager with torch's foreach Adam instead of main.py's (fused on CUDA: the rounding that choice changes).
    Reports the largest difference of the first step's logits, and over every parameter and BatchNorm statistic at
    the end: the largest absolute difference and its tensor, and the tensor whose difference is largest relative to
    its own largest magnitude."""
    runs = []
    for use_graph, foreach in ((False, False), (False, False), (True, False), (False, True)):
        model, optimizer, amp, images, observed = roof_model(device, foreach=foreach)
        forward = trainstep.FastTrainStep(model, BSIZE, compile=False, cuda_graph=use_graph, required=True,
                                          verbose=False) if use_graph else model  # fmt: skip
        forward.train()
        generator = torch.Generator(device=device).manual_seed(1)
        first_logits = None
        for _ in range(steps):
            x = loaders.to_model_input(images, torch.rand(BSIZE, device=device, generator=generator) < 0.5)
            with amp:
                logits = forward(x)
            if first_logits is None:
                first_logits = logits.detach().float().clone()
            loss, _ = losses.large_loss(logits, observed, "LL-R", 0.004)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        tensors = {n: t.detach().float().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}
        runs.append((first_logits, tensors))

    def compare(a, b) -> dict:
        diffs = {n: float((a[1][n] - b[1][n]).abs().max()) for n in a[1]}
        scale = {n: float(a[1][n].abs().max()) for n in a[1]}
        worst = max(diffs, key=lambda n: diffs[n] / max(scale[n], 1e-12))
        relative = {"tensor": worst, "abs": diffs[worst], "its_largest_magnitude": scale[worst],
                    "relative": diffs[worst] / max(scale[worst], 1e-12)}  # fmt: skip
        largest = max(diffs, key=lambda n: diffs[n])
        return {"first_logits": float((a[0] - b[0]).abs().max()), "largest_abs": diffs[largest],
                "largest_abs_tensor": largest, "worst_relative": relative}  # fmt: skip

    return {"steps": steps, "eager_vs_eager": compare(runs[0], runs[1]), "graph_vs_eager": compare(runs[0], runs[2]),
            "foreach_adam_vs_eager": compare(runs[0], runs[3])}  # fmt: skip


def timed(step, device: torch.device, batch_size: int, batches: int | None = None) -> float:
    """Images per second of ``step`` over ``batches`` (default: the settings') after warm-up (one synchronisation at
    each end)."""
    batches = batches or SETTINGS["batches"]
    for _ in range(SETTINGS["warmup"]):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------------
# 2. The official-style pipeline (bench/throughput.py), and 3. the COCO tree and this project's data path.


def official_style(paths: list[str], device: torch.device) -> dict:
    """The released code's pipeline: training rate (4 workers, fp32, NCHW) and evaluation rate (batch 16, fp32), with
    the official code's own setting, ``cudnn.benchmark`` off, and timed as main.py's rates are read: after a full
    warm-up pass, over full batches only (the smaller last batch dropped; ``throughput.measure``)."""
    torch.manual_seed(0)
    model = throughput.build_model(SETTINGS["arch"], NUM_CLASSES).to(device)
    loader = torch.utils.data.DataLoader(
        throughput.OfficialStyle(paths, SETTINGS["size"]), batch_size=BSIZE, shuffle=True, num_workers=4,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=True,
    )  # fmt: skip
    args = SimpleNamespace(batches=SETTINGS["batches"], bsize=BSIZE)

    def prepare(batch):
        return batch[0].to(device, non_blocking=True)

    amp = throughput._no_amp
    result = throughput.run_pipeline("official-style", loader, prepare, model, device, amp, args, benchmark=False)
    result["eval_img_s"] = throughput.eval_throughput(model, loader, prepare, device, amp, args, benchmark=False)
    result = {k: v for k, v in result.items() if k in ("train_img_s", "eval_img_s", "data_img_s")}
    return {**result, "cudnn_benchmark": False, "timing": "a full warm-up pass, then full batches only"}


def make_coco_tree(root: Path) -> list[str]:
    """COCO 2014's layout and annotation format with generated JPEGs; every image gets 1-4 random categories.
    Returns the test (val2014) image paths."""
    rng = np.random.default_rng(0)
    category_ids = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
                    *range(84, 91)]  # fmt: skip
    categories = [{"supercategory": "thing", "id": c, "name": f"category{c}"} for c in category_ids]
    (root / "annotations").mkdir(parents=True)
    test_paths = []
    for phase, count, first_id in (("train", SETTINGS["train2014"], 1), ("val", SETTINGS["val2014"], 500_000)):
        folder = root / f"{phase}2014"
        folder.mkdir()
        image_ids = list(range(first_id, first_id + count))
        names = [f"COCO_{phase}2014_{i:012d}.jpg" for i in image_ids]
        paths = throughput.make_jpegs_named(folder, names, *SETTINGS["jpeg"])
        if phase == "val":
            test_paths = paths
        annotations = []
        for image_id in image_ids:
            for c in rng.choice(category_ids, size=rng.integers(1, 5), replace=False):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c),
                                    "iscrowd": 0, "area": 100.0, "bbox": [0, 0, 10, 10]})  # fmt: skip
        images = [{"id": i, "file_name": n, "width": SETTINGS["jpeg"][0], "height": SETTINGS["jpeg"][1]}
                  for i, n in zip(image_ids, names, strict=True)]  # fmt: skip
        data = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{phase}2014.json").write_text(json.dumps(data))
    return test_paths


def data_path_rate(paths: list[str], device: torch.device) -> dict:
    """This project's evaluation data path alone (decode and resize in one worker per core, batches of 16 in pinned
    memory, copied to the device and normalised), in images per second over one pass after a warm-up pass; and
    whether the batches reach the device as the workers laid them out (channels-last: nothing transposed on the way)."""
    split = datasets.Split("/", np.array(paths), None, None)
    cfg = SimpleNamespace(bsize=BSIZE, seed=0, num_workers=cores(), image_size=SETTINGS["size"])
    loader = loaders.make_loader(split, cfg, train=False, pin_memory=device.type == "cuda")
    rates, layouts = [], set()
    for _ in range(2):
        start = time.perf_counter()
        for images, _ in loader:
            on_device = loaders.batch_to_device(images, device)  # as main.py copies it
            layouts.add(on_device.is_contiguous(memory_format=torch.channels_last))
            loaders.to_model_input(on_device)
        sync(device)
        rates.append(len(paths) / (time.perf_counter() - start))
    # The same loader through main.py's own scoring loop (evaluation.predict) with the model, outside main.py: if
    # main.py's
    # evaluation is slower than this, the difference is in main.py; if this is already slower than the data path alone,
    # it is the pipeline itself (e.g. the batches of a pass arriving in waves, the last one scored after the workers
    # are done).
    model, _, amp, _, _ = roof_model(device)
    model.eval()

    def predict_rate(scored) -> float:
        rates = []
        for _ in range(2):
            start = time.perf_counter()
            evaluation.predict(model, scored, device, "predict", lambda: amp)
            sync(device)
            rates.append(len(paths) / (time.perf_counter() - start))
        return rates[-1]

    out = {"eval_img_s": rates[-1], "predict_img_s": predict_rate(loader), "channels_last_on_device": layouts == {True}}
    out["pass_order"] = resize.pass_order()
    if out["pass_order"] is not None:
        try:  # any failure here (an operator the device lacks, pinning) is recorded; the check goes on without it
            out.update(device_resize_rates(split, cfg, loader, device, predict_rate))
        except Exception as err:
            out["device_resize_error"] = error_line(err)
    return out


def device_resize_rates(split, cfg, loader, device: torch.device, predict_rate) -> dict:
    """``--eval_resize device`` on the same images: the first pass (a warm-up) also compares every batch with the
    workers' ``loader`` (one read-back per batch, outside the timed pass); then the resize alone on a batch already
    on the device (its cost in device time), the data path timed alone, and the scoring loop."""
    decoded = loaders.make_loader(split, cfg, train=False, pin_memory=device.type == "cuda", eval_resize="device")
    same, kept = True, None
    for (expected, _), (images, _) in zip(loader, decoded, strict=True):
        if kept is None:
            kept = images.to(device)
        same &= torch.equal(loaders.batch_to_device(images, device), expected.to(device))
    out = {"device_resize_same_pixels": same}
    repeats = 3 if SMALL else 50
    kept.resize()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        kept.resize()
    sync(device)
    out["device_resize_only_img_s"] = repeats * len(kept) / (time.perf_counter() - start)
    start = time.perf_counter()
    for images, _ in decoded:
        loaders.to_model_input(loaders.batch_to_device(images, device))
    sync(device)
    out["device_resize_img_s"] = len(split) / (time.perf_counter() - start)
    out["predict_device_resize_img_s"] = predict_rate(decoded)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 4. main.py itself.


def main_py(data_root: Path, save: Path, name: str, *extra: str, required: bool = True, timeout: int = 420) -> dict:
    """A real ``main.py`` run on the COCO tree; rates from the epochs after the first. A run that fails or takes more
    than ``timeout`` seconds stops the check, unless not ``required``: then its ``error`` (the output's last line, or
    the timeout) is the result."""
    args = [sys.executable, str(REPO / "main.py"), "--dataset", "coco", "--mod_scheme", "LL-R", "--data_root",
            str(data_root), "--save_path", str(save), "--exp_name", name, "--use_pretrained", "false",
            "--num_epochs", str(SETTINGS["epochs"]), "--arch", SETTINGS["arch"], "--image_size",
            str(SETTINGS["size"]), *extra]  # fmt: skip
    log(" ".join(args[1:]))
    start = time.time()
    try:
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if required:
            raise
        log(f"main.py took more than {timeout} s: stopped")
        return {"error": f"stopped after {timeout} s"}
    if proc.returncode:
        message = f"main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if required:
            sys.exit(message)
        log(message)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return {"error": lines[-1][:300] if lines else f"exit {proc.returncode}"}
    records = [json.loads(line) for line in (save / name / "log.jsonl").read_text().splitlines()]
    final = json.loads((save / name / "final.json").read_text())
    train_images, val_images = final["train_images"], final["val_images"]
    later = records[1:] or records  # an early stop after epoch 1 leaves only the first epoch to read
    train_s = sum(r["train_seconds"] for r in later)
    eval_s = sum(r["val_seconds"] for r in later) + final["test_seconds"]
    result = {
        "train_img_s": len(later) * train_images / train_s,
        "eval_img_s": (len(later) * val_images + final["test_images"]) / eval_s,
        "first_epoch_s": records[0]["seconds"],
        "later_epoch_s": sum(r["seconds"] for r in later) / len(later),
        "epochs_run": len(records),
        "test_map": final["test_map"],
        "wall_s": time.time() - start,
    }
    result["val_img_s"] = len(later) * val_images / sum(r["val_seconds"] for r in later)
    result["test_img_s"] = final["test_images"] / final["test_seconds"]
    # Each pass's fill (its first batch's wait, the device idle) apart from the rate it then runs at: the check's
    # passes are short (250 steps, 63 batches), COCO's 16 to 40 times longer, so the fill weighs that much less there.
    train_fill = [r["train_first_batch_seconds"] for r in later]
    eval_fill = [r["val_first_batch_seconds"] for r in later] + [final["test_first_batch_seconds"]]
    result["fill_s"] = {"train": sum(train_fill) / len(later), "val": sum(eval_fill[:-1]) / len(later),
                        "test": eval_fill[-1]}  # fmt: skip
    result["train_steady_img_s"] = len(later) * train_images / (train_s - sum(train_fill))
    result["eval_steady_img_s"] = (len(later) * val_images + final["test_images"]) / (eval_s - sum(eval_fill))
    result["fast_step"] = final.get("fast_step", "eager")
    if "fast_step_warmup_s" in final:
        result["warmup_s"] = final["fast_step_warmup_s"]
    return result


def main_py_eager(data_root: Path, save: Path, out: dict, *extra: str) -> dict:
    """main.py with ``--cuda_graph off`` and, when the data path showed that it gives the workers' pixels here,
    ``--eval_resize device``: evaluation is eager in every run, so this run's evaluation rate is main.py's with the
    device resize. If that run fails, the failure is recorded and the run repeated without the flag, so that the
    check keeps an eager training rate. ``eval_resize`` says which ran."""
    eval_resize = "device" if out["data_path"].get("device_resize_same_pixels") else "workers"
    log(f"main.py with --cuda_graph off --eval_resize {eval_resize}", out)
    result = main_py(data_root, save, "eager", "--cuda_graph", "off", "--eval_resize", eval_resize, *extra,
                     required=eval_resize == "workers")  # fmt: skip
    if "error" in result:
        failed, eval_resize = result["error"], "workers"
        log("main.py with --cuda_graph off, again with --eval_resize workers", out)
        result = main_py(data_root, save, "eager_workers", "--cuda_graph", "off", *extra)
        result["device_resize_run_error"] = failed
    return {**result, "eval_resize": eval_resize}


def coco_minutes(train_img_s: float, eval_img_s: float, fill: dict | None = None) -> float:
    """The paper's COCO run at these rates; with ``fill`` (seconds per pass: ``train``, ``val``, ``test``), the rates
    are the passes' steady ones and each pass pays its fill once."""
    fill = fill or {"train": 0.0, "val": 0.0, "test": 0.0}
    epoch = fill["train"] + COCO["train"] / train_img_s + fill["val"] + COCO["val"] / eval_img_s
    return (COCO["epochs"] * epoch + fill["test"] + COCO["test"] / eval_img_s) / 60


def compile_timeout(elapsed: float, budget: float | None = None) -> int | None:
    """Seconds the --compile run may take, ``elapsed`` seconds into the check, so that the check ends within
    ``budget`` (default ``BUDGET_S``); None when under ``MIN_COMPILE_S`` would remain."""
    left = min(COMPILE_S, (BUDGET_S if budget is None else budget) - elapsed - END_S)
    return int(left) if left >= MIN_COMPILE_S else None


def rounded(value):
    if isinstance(value, float):  # four significant digits below 10 (a drift of 1e-5 stays readable), else one decimal
        return round(value, 1) if abs(value) >= 10 else float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="any --arch main.py takes, built as main.py builds it (default: "
                        f"{SETTINGS['arch']}); the roof is that model alone")  # fmt: skip
    arch = parser.parse_args().arch
    if arch:
        SETTINGS["arch"] = arch
    started = time.time()
    cuda = torch.cuda.is_available() and not SMALL
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    out: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({cores()} cores)",
        "torch": torch.__version__,
        "small": SMALL,
        "settings": {**SETTINGS, "batch_size": BSIZE},
    }
    log(f"roof on {out['device']}")
    roof_start = roof(device, graph=False)
    out["roof_measurements"] = {"start": roof_start}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        log("generating the COCO-2014 tree", out)
        t = time.time()
        test_paths = make_coco_tree(root)
        out["tree"] = {"train2014": SETTINGS["train2014"], "val2014": SETTINGS["val2014"], "seconds": time.time() - t}
        log("official-style pipeline", out)
        out["official_style"] = official_style(test_paths, device)
        log("data path", out)
        out["data_path"] = data_path_rate(test_paths, device)
        device_flag = ["--device", "cuda" if cuda else "cpu"]
        out["main_py"] = main_py(root, Path(tmp) / "runs", "default", *device_flag)
        out["main_py_eager"] = main_py_eager(root, Path(tmp) / "runs", out, *device_flag)
        timeout = None if SKIP_COMPILE else compile_timeout(time.time() - started)
        if timeout is not None:  # compilation took about 50 s and the run about 100 s before
            log(f"main.py with --compile (at most {timeout} s)", out)  # with the CUDA graph on a GPU
            out["main_py_compile"] = main_py(root, Path(tmp) / "runs", "compiled", "--compile", "true", *device_flag,
                                             required=False, timeout=timeout)  # fmt: skip
            out["main_py_compile"]["timeout_s"] = timeout
        elif not SKIP_COMPILE:
            out["main_py_compile"] = {"error": f"left out: under {MIN_COMPILE_S:.0f} s of the {BUDGET_S:.0f} s left"}
            log(out["main_py_compile"]["error"], out)
    log("roof again, on the warm GPU", out)
    roof_end = roof(device, graph=cuda, candidates=True)
    if cuda:
        log("graph check", out)
        try:
            out["graph_check"] = graph_check(device)
        except RuntimeError as err:
            out["graph_check"] = {"error": str(err).splitlines()[0][:300]}
    # The roof is the faster of two measurements (before and after the runs: clocks, cuDNN's choices), so that the
    # ratios against it are the conservative ones.
    both = (roof_start, roof_end)
    rates = sorted({k for d in both for k, v in d.items() if isinstance(v, float)})
    out["roof"] = {k: max(d[k] for d in both if isinstance(d.get(k), float)) for k in rates}
    out["roof_measurements"]["end"] = roof_end
    roof_train, roof_eval = out["roof"]["train_img_s"], out["roof"]["eval_img_s"]
    official, project, eager = out["official_style"], out["main_py"], out["main_py_eager"]
    compiled = {"train_img_s": float("nan"), "eval_img_s": float("nan"), **out.get("main_py_compile", {})}
    eval_limit = min(roof_eval, out["data_path"]["eval_img_s"])
    out["ratios"] = {
        "train_vs_roof": project["train_img_s"] / roof_train,
        "eager_train_vs_roof": eager["train_img_s"] / roof_train,
        "compile_train_vs_roof": compiled["train_img_s"] / roof_train,
        "train_vs_official": project["train_img_s"] / official["train_img_s"],
        "compile_train_vs_official": compiled["train_img_s"] / official["train_img_s"],
        "compile_train_vs_default": compiled["train_img_s"] / project["train_img_s"],
        "default_train_vs_eager": project["train_img_s"] / eager["train_img_s"],
        "eval_vs_limit": project["eval_img_s"] / eval_limit,
        "eval_steady_vs_limit": project["eval_steady_img_s"] / eval_limit,  # each pass's fill left out
        "eval_vs_predict_alone": project["eval_img_s"] / out["data_path"]["predict_img_s"],
    }
    if eager["eval_resize"] == "device":  # main.py's evaluation with the device resize, against the workers' resize
        path = out["data_path"]
        out["ratios"]["eval_device_resize_vs_workers"] = eager["eval_img_s"] / project["eval_img_s"]
        out["ratios"]["eval_device_resize_vs_limit"] = eager["eval_img_s"] / min(roof_eval, path["device_resize_img_s"])
        out["ratios"]["predict_device_resize_vs_workers"] = path["predict_device_resize_img_s"] / path["predict_img_s"]
    if "train_graph_img_s" in out["roof"]:
        out["ratios"]["train_vs_graph_roof"] = project["train_img_s"] / out["roof"]["train_graph_img_s"]
        out["ratios"]["train_steady_vs_graph_roof"] = project["train_steady_img_s"] / out["roof"]["train_graph_img_s"]
    # The candidates against what main.py runs, measured in turn with it (only at the end: ``roof(candidates=True)``).
    for name in ("train", "train_graph"):  # Adam as one fused kernel (main.py's on CUDA) against foreach
        if f"{name}_fused_adam_img_s" in roof_end:
            fused = roof_end[f"{name}_fused_adam_img_s"] / roof_end[f"{name}_foreach_adam_img_s"]
            out["ratios"][f"{name}_fused_adam_vs_foreach"] = fused
    for name in ("train", "train_graph", "eval"):  # fed from host memory: copies on a side / the current stream
        if f"{name}_fed_img_s" in roof_end:
            fed = roof_end[f"{name}_fed_img_s"] / roof_end[f"{name}_fed_same_stream_img_s"]
            out["ratios"][f"{name}_copy_side_stream_vs_same"] = fed
    out["coco_run_minutes"] = {
        "project": coco_minutes(project["train_img_s"], project["eval_img_s"]),
        "project_eager": coco_minutes(eager["train_img_s"], eager["eval_img_s"]),
        "project_compile": coco_minutes(compiled["train_img_s"], compiled["eval_img_s"])
        + compiled.get("warmup_s", 0.0) / 60,
        "official_style": coco_minutes(official["train_img_s"], official["eval_img_s"]),
    }
    if eager["eval_resize"] == "device":  # the default (or compiled) run's training, the device-resize run's evaluation
        out["coco_run_minutes"]["project_device_resize"] = coco_minutes(project["train_img_s"], eager["eval_img_s"])
        out["coco_run_minutes"]["project_compile_device_resize"] = (
            coco_minutes(compiled["train_img_s"], eager["eval_img_s"]) + compiled.get("warmup_s", 0.0) / 60
        )
    # The same run with each pass's fill paid once per COCO pass instead of once per the check's shorter pass.
    steady = (project["train_steady_img_s"], project["eval_steady_img_s"], project["fill_s"])
    out["coco_run_minutes"]["project_fill_per_pass"] = coco_minutes(*steady)
    for part in ("ratios", "coco_run_minutes"):  # without a --compile result: no compile entries
        out[part] = {k: v for k, v in out[part].items() if v == v}
    out["total_seconds"], out["budget_s"] = time.time() - started, BUDGET_S
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
