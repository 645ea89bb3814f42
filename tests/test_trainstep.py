"""The training step's fast path (trainstep.py) and the shared pool of loader workers, on a CPU: which batches take
the captured graph, that the capture leaves BatchNorm's statistics as an eager run has them, the fallback, and that
one pool of workers serves every split with the batches separate loaders give."""

import numpy as np
import pytest
import torch
from conftest import drop_timings

import datasets
import distributed
import label_state
import loaders
import models
import registry
import train
import trainstep
from config import parse_config


def tiny_model():
    torch.manual_seed(0)
    return models.build_model("smallcnn", 16, use_pretrained=False)


class FakeCapture:
    """Stands in for ``torch.cuda.make_graphed_callables`` on a CPU: runs the warm-up passes it runs (which move
    BatchNorm's running statistics) and returns a callable that counts its replays and computes eagerly."""

    def __init__(self, fail: bool = False) -> None:
        self.captures, self.replays, self.fail = 0, 0, fail

    def __call__(self, module, sample_args):
        self.captures += 1
        for _ in range(3):
            module(*sample_args).sum().backward()
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

        def replay(x):
            self.replays += 1
            return module(x)

        return replay


def test_only_full_training_batches_replay_and_the_capture_restores_batchnorm(monkeypatch):
    fake = FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake)
    model, reference = tiny_model(), tiny_model()
    step = trainstep.FastTrainStep(model, 4, compile=False, cuda_graph=True, verbose=False)
    step.train()
    reference.train()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(step(x), reference(x))  # captured on this batch, then replayed once
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):
        assert torch.equal(a, b)  # the warm-up's three extra BatchNorm updates are undone
    step(torch.randn(3, 3, 32, 32))  # a smaller last batch: eager
    step.eval()
    step(torch.randn(4, 3, 32, 32))  # evaluation: eager
    step.train()
    step(x)
    assert (fake.captures, fake.replays) == (1, 2)
    assert step.warmup_s is not None and step.what == "CUDA graph"


def test_a_failed_capture_falls_back_under_auto_and_stops_under_on(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", FakeCapture(fail=True))
    model, reference = tiny_model(), tiny_model()
    step = trainstep.FastTrainStep(model, 4, compile=False, cuda_graph=True, verbose=False)
    step.train()
    reference.train()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(step(x), reference(x))  # runs eagerly, statistics as eager
    assert not step.use_graph and step.what == "eager"
    assert "could not be captured (operation not permitted when stream is capturing)" in capsys.readouterr().out
    required = trainstep.FastTrainStep(tiny_model(), 4, compile=False, cuda_graph=True, required=True, verbose=False)
    with pytest.raises(trainstep.GraphCaptureError, match=r"captured as a CUDA graph \(operation not permitted .*\)"):
        required.train()(x)


def test_a_failed_capture_of_a_compiled_step_keeps_it_compiled_and_times_the_attempt(monkeypatch):
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", FakeCapture(fail=True))
    compiled_calls = []

    def fake_compile(module, **kwargs):  # a stand-in that records its calls (a real compilation takes long on a CPU)
        return lambda x: compiled_calls.append(x.shape[0]) or module(x)

    monkeypatch.setattr(torch, "compile", fake_compile)
    step = trainstep.FastTrainStep(tiny_model(), 4, compile=True, cuda_graph=True, verbose=False).train()
    assert step.what == "torch.compile + CUDA graph"
    x = torch.randn(4, 3, 32, 32)
    step(x)
    step(x)
    assert step.what == "torch.compile" and step.warmup_s is not None  # the attempt, compilation included
    first = step.warmup_s
    step(x)
    assert step.warmup_s == first  # not replaced by a later step's time
    assert len(compiled_calls) == 3 + 3  # the capture's warm-up passes, then every full batch compiled


def test_cuda_graph_is_auto_on_one_cuda_device_and_refused_where_it_cannot_run():
    assert trainstep.cuda_graph_reason(torch.device("cuda", 0), distributed=False) is None
    assert "CUDA device" in trainstep.cuda_graph_reason(torch.device("cpu"), distributed=False)
    assert "torchrun" in trainstep.cuda_graph_reason(torch.device("cuda", 0), distributed=True)
    model, cpu, single = tiny_model(), torch.device("cpu"), distributed.Context()
    assert train.wrap_model(parse_config(["--exp_name", "x"]), model, cpu, single) is model  # auto: off on a CPU
    compiled = train.wrap_model(parse_config(["--exp_name", "x", "--compile"]), model, cpu, single)
    assert compiled.what == "torch.compile" and not compiled.use_graph
    # (--cuda_graph on where it cannot run stops the run before anything is written: tests/test_bad_input.py)
    gpu = torch.device("cuda", 0)  # nothing touches the device before the first step
    for flags, graph, what in (([], True, "CUDA graph"), (["--compile"], True, "torch.compile + CUDA graph"),
                               (["--compile", "--cuda_graph", "on"], True, "torch.compile + CUDA graph"),
                               (["--compile", "--cuda_graph", "off"], False, "torch.compile"),
                               (["--cuda_graph", "off"], None, "eager")):  # fmt: skip
        step = train.wrap_model(parse_config(["--exp_name", "x", *flags]), model, gpu, single)
        assert (step is model) if graph is None else (step.use_graph is graph and step.batch_size == 16), flags
        assert getattr(step, "what", "eager") == what, flags


def split_of(synthetic_root, first: int, n: int) -> datasets.Split:
    names = np.array([f"train/train_{i:06d}.png" for i in range(first, first + n)])
    return datasets.Split(str(synthetic_root / "images"), names, None, None)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pool_of_workers_gives_each_split_the_batches_of_its_own_loader(synthetic_root, workers):
    cfg = parse_config(["--exp_name", "x", "--num_workers", str(workers), "--bsize", "4"])
    splits = {"train": split_of(synthetic_root, 0, 10), "val": split_of(synthetic_root, 10, 6),
              "test": split_of(synthetic_root, 16, 5)}  # fmt: skip
    parts = {name: (split, name == "train", None) for name, split in splits.items()}
    pooled = loaders.make_loaders(parts, cfg, pin_memory=False)
    assert len({id(loader.pool) for loader in pooled.values()}) == 1
    alone = {name: loaders.make_loader(split, cfg, train=name == "train", pin_memory=False)
             for name, split in splits.items()}  # fmt: skip

    def batches(loader):
        return [(images.clone(), rows.clone()) for images, rows in loader]

    for epoch in (1, 2):
        for name in ("train", "val", "test"):
            for loader in (pooled[name], alone[name]):
                loader.batch_sampler.set_epoch(epoch)
            got, expected = batches(pooled[name]), batches(alone[name])
            assert len(got) == len(pooled[name]) == len(alone[name])
            for (a, rows_a), (b, rows_b) in zip(got, expected, strict=True):
                assert torch.equal(rows_a, rows_b) and torch.equal(a, b)
        next(iter(pooled["train"]))  # an iteration left unfinished does not leak into the next split's
    assert [rows.tolist() for _, rows in pooled["test"]] == [[0, 1, 2, 3], [4]]


def test_epochs_through_the_fast_step_equal_eager_epochs(synthetic_root, monkeypatch):
    """Whole epochs (last batch smaller, LL-Cp corrections, Adam): the captured path, warm-up included, leaves the
    parameters, BatchNorm's statistics, losses and selections exactly as the eager path does."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", FakeCapture())
    cfg = parse_config(["--mod_scheme", "LL-Cp", "--exp_name", "x", "--bsize", "8", "--num_workers", "0"])
    split = split_of(synthetic_root, 0, 20)
    results = []
    for fast in (False, True):
        model = tiny_model()
        forward = trainstep.FastTrainStep(model, 8, compile=False, cuda_graph=True, verbose=False) if fast else model
        optimizer = train.build_optimizer(cfg, model)
        initial = np.zeros((20, 16), dtype=np.int8)
        initial[:, 0] = 1
        state = label_state.LabelState(label_state.DenseLabelStore(initial, torch.device("cpu")))
        loader = loaders.make_loader(split, cfg, train=True, pin_memory=False)
        stats = [train.train_one_epoch(cfg, forward, loader, optimizer, state, rate=0.05, epoch=e,
                                       device=torch.device("cpu")) for e in (1, 2)]  # fmt: skip
        results.append((stats, model.state_dict(), state.observed.matrix.clone()))
    (stats_a, weights_a, labels_a), (stats_b, weights_b, labels_b) = results
    drop_timings(*stats_a, *stats_b)
    assert stats_a == stats_b and torch.equal(labels_a, labels_b)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_a_method_that_needs_the_eager_forward_keeps_it():
    """A registry entry with ``eager_forward`` turns the graph off under auto; under on the run is refused with it."""
    an = registry.get("an", registry.LOSS)
    entry = registry.Method("hooked", registry.LOSS, summary="AN with a forward hook (a test method)", loss=an.loss,
                           eager_forward="it reads a forward hook's output every step")  # fmt: skip
    registry.register(entry)
    try:
        cfg, gpu, single = (
            parse_config(["--exp_name", "x", "--loss", "hooked"]),
            torch.device("cuda", 0),
            distributed.Context(),
        )
        assert train.cuda_graph_refusal(cfg, gpu, single) == (
            "--loss hooked needs the model's forward run eagerly: it reads a forward hook's output every step"
        )
        model = tiny_model()
        assert train.wrap_model(cfg, model, gpu, single) is model
    finally:
        registry.unregister("hooked")
    assert train.cuda_graph_refusal(parse_config(["--exp_name", "x"]), gpu, single) is None
