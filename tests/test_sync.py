"""The training step never waits for the GPU: counted on a CPU with a dispatch mode that sees every operator.

On a GPU, these operators make the host wait for the device: reading a value (``aten._local_scalar_dense``:
``.item()``, ``int()``/``float()``/``bool()`` of a tensor, ``if tensor``), ``nonzero`` and ``masked_select`` (their
output size depends on the data), and indexing with a boolean mask (``index`` / ``index_put_``, which call
``nonzero``). A CPU run calls the same operators, so counting them here shows what a GPU run would wait for. Left out:
the optimiser's step counters (host tensors on a GPU too) and the data loader (its batches are collected before the
count starts). The count may grow with the number of steps only by the periodic check (every ``CHECK_EVERY`` steps).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import datasets
import loaders
import models
import registry
import train
from config import parse_config

aten = torch.ops.aten
ALWAYS_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
BOOLEAN_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class SyncCounter(TorchDispatchMode):
    """Counts the operators that synchronise on a GPU, by name; ``ignored`` holds data pointers of host tensors."""

    def __init__(self, ignored: set[int]) -> None:
        super().__init__()
        self.ignored = ignored
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ALWAYS_SYNC:
            if not (isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.ignored):
                self.calls[str(func)] += 1
        elif func in BOOLEAN_INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.calls[f"{func} (boolean index)"] += 1
        return func(*args, **kwargs)


class Batches:
    """A loader stand-in: the first ``steps`` batches of an epoch, decoded before counting starts. ``marks`` records
    the counter's total as each batch is handed out, so the growth per step can be read from one epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, epoch: int, steps: int, counter=None) -> None:
        self.batch_sampler = loader.batch_sampler
        self.batch_sampler.set_epoch(epoch)
        self.batches = [batch for batch, _ in zip(loader, range(steps), strict=False)]
        self.counter, self.marks = counter, []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if self.counter is not None:
                self.marks.append(sum(self.counter.calls.values()))
            yield batch


def step_counters(optimizer: torch.optim.Optimizer) -> set[int]:
    return {s["step"].data_ptr() for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)}


def count_syncs(cfg, data, steps: int) -> tuple[list[int], collections.Counter]:
    """The running count of synchronising calls before each of ``steps`` training steps of one epoch (epoch 3, so
    LL selects entries), and the calls by operator."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = models.build_model(cfg.arch, data.num_classes, use_pretrained=False).to(memory_format=torch.channels_last)
    state = registry.build_label_state(cfg, data.train, device)
    optimizer = train.build_optimizer(cfg, model, state)
    loader = loaders.make_loader(data.train, cfg, train=True, pin_memory=False)
    epoch = 3
    # One step outside the count creates the optimiser's state (its step counters live on the host on a GPU too).
    train.train_one_epoch(
        cfg, model, Batches(loader, epoch, 1), optimizer, state, rate=0.01, epoch=epoch, device=device
    )
    counter = SyncCounter(step_counters(optimizer))
    batches = Batches(loader, epoch, steps, counter)
    with counter:
        train.train_one_epoch(cfg, model, batches, optimizer, state, rate=0.01, epoch=epoch, device=device)
    return batches.marks, counter.calls


@pytest.fixture(scope="module")
def tiny_data(synthetic_root):
    cfg = parse_config(["--data_root", str(synthetic_root), "--ss_frac_train", "0.05", "--exp_name", "x"])
    return datasets.build_data(cfg)


METHODS = [
    ("--mod_scheme", "LL-R"),
    ("--mod_scheme", "LL-Ct"),
    ("--mod_scheme", "LL-Cp"),
    ("--mod_scheme", "AN"),
    ("--loss", "wan"),
    ("--loss", "lsan"),
    ("--loss", "epr"),
    ("--loss", "role"),
    ("--loss", "em"),
    ("--loss", "em_apl"),
    ("--loss", "gr"),
    ("--loss", "vlpl"),  # the pseudo-labels of each image's flip, picked by integer indexing
    ("--loss", "aevlp"),
]


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", METHODS, ids=[v for _, v in METHODS])
def test_the_training_step_does_not_synchronise(synthetic_root, tiny_data, flag, value, monkeypatch):
    # The periodic check (every CHECK_EVERY steps, 0.04 per step) is the loop's one synchronisation: moved out of
    # reach here, the count must not grow at all from step to step. Diagnostics are on (the synthetic data has full
    # labels), as for every dataset of the paper.
    monkeypatch.setattr(train, "CHECK_EVERY", 1000)
    extra = ["--mod_scheme", "AN"] if flag == "--loss" else []
    cfg = parse_config(["--data_root", str(synthetic_root), "--bsize", "2", "--exp_name", "x", flag, value, *extra])
    marks, calls = count_syncs(cfg, tiny_data, 8)
    assert marks[-1] == marks[1], f"{(marks[-1] - marks[1]) / 6:.2f} synchronising calls per step: {dict(calls)}"


def test_the_counter_sees_what_synchronises():
    """The counter itself: it must flag .item(), boolean indexing and nonzero, and not integer indexing."""
    x = torch.arange(6.0)
    counter = SyncCounter(set())
    with counter:
        x.sum().item()
        x[x > 2].sum()
        x[torch.tensor([0, 1])].sum()
        (x > 1).nonzero()
        with contextlib.suppress(RuntimeError):
            bool(x.sum() > 0)
    assert sum(counter.calls.values()) == 4, dict(counter.calls)


class FakeStreams:
    """Stand-ins for CUDA streams on a CPU: every copy, wait and ``record_stream`` is logged with its stream."""

    def __init__(self, monkeypatch) -> None:
        self.log: list[str] = []
        self.side, self.current = self.Stream("side", self.log), self.Stream("current", self.log)
        self.active = [self.current]
        self.copies: set[int] = set()  # ids of the tensors the copies made
        monkeypatch.setattr(loaders, "_copy_stream", lambda device: self.side)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.active[-1])
        monkeypatch.setattr(torch.cuda, "stream", self.use)
        copy = torch.Tensor.to

        def to(t, *args, **kwargs):
            self.log.append(f"copy on {self.active[-1].name}")
            out = copy(t, *args, **kwargs).clone()  # a new tensor, as a copy to another device is
            self.copies.add(id(out))
            return out

        def record_stream(t, stream):
            self.log.append(f"{'copy' if id(t) in self.copies else 'another tensor'} kept for {stream.name}")

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)

    class Stream:
        def __init__(self, name: str, log: list[str]) -> None:
            self.name, self.log = name, log

        def wait_stream(self, other) -> None:
            self.log.append(f"{self.name} waits for {other.name}")

    @contextlib.contextmanager
    def use(self, stream):
        self.active.append(stream)
        try:
            yield
        finally:
            self.active.pop()


def test_batches_cross_to_the_device_on_a_side_stream(monkeypatch):
    """On CUDA a batch is copied on a side stream, the current stream waits for that copy (on the device), and the
    copy's memory is kept until the current stream is done with it; same values. Without the side stream the copy
    would wait for the previous step's kernels and hold back the next step's."""
    images = torch.arange(48, dtype=torch.uint8).view(2, 3, 2, 4)
    streams = FakeStreams(monkeypatch)
    assert torch.equal(loaders.batch_to_device(images, torch.device("cpu")), images)
    assert streams.log == ["copy on side", "current waits for side", "copy kept for current"]

    streams.log.clear()
    monkeypatch.setattr(loaders, "SIDE_STREAM_COPIES", False)  # the GPU check's baseline
    loaders.batch_to_device(images, torch.device("cpu"))
    assert streams.log == ["copy on current"]


def test_decoded_batches_cross_on_the_side_stream_too(monkeypatch, tmp_path):
    """``--eval_resize device``: every tensor of a ``resize.DecodedBatch`` is copied on the side stream and kept for
    the current one, which waits for the copies before it resizes; the pixels are the workers'."""
    import numpy as np
    from PIL import Image

    import resize

    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (12, 12)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    order = resize.pass_order()
    decoded = resize.DecodedBatch.collate([loaders.decode_for_device(p, 16, order) for p in paths])
    expected = torch.stack([torch.from_numpy(loaders.load_image(p, 16)).permute(2, 0, 1) for p in paths])
    tensors = sum(len(g) for _, g in decoded.groups)
    streams = FakeStreams(monkeypatch)
    images = loaders.batch_to_device(decoded, torch.device("cpu"))
    assert torch.equal(images, expected)
    wait = streams.log.index("current waits for side")
    assert streams.log[:wait] == ["copy on side"] * tensors
    assert streams.log[wait + 1 : wait + 1 + tensors] == ["copy kept for current"] * tensors
    assert "copy on side" not in streams.log[wait:]


def test_off_cuda_there_is_no_side_stream():
    assert loaders._copy_stream(torch.device("cpu")) is None


def test_a_bare_cuda_device_gets_the_current_devices_stream(monkeypatch):
    """The side stream is cached per device: ``cuda`` is named ``cuda:N`` (the current device) first, so that a copy
    made after a change of the current device does not go to the stream of the one before."""
    asked = []
    monkeypatch.setattr(loaders, "_copy_stream", lambda device: asked.append(device))  # None: no side stream
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    loaders.batch_to_device(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.device("cpu"))
    with contextlib.suppress(RuntimeError, AssertionError):  # no CUDA here: the copy itself fails after the lookup
        loaders.batch_to_device(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.device("cuda"))
    assert asked == [torch.device("cpu"), torch.device("cuda", 3)]
