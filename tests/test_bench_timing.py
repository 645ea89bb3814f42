"""The benchmarks time every pipeline alike: a full warm-up pass, then full batches only (a batch of another size
inside a timed window is refused), the official-style side without cudnn.benchmark as the official code, and the
model built from --arch exactly as main.py builds it."""

import pytest
import torch
from conftest import REPO

import models


@pytest.fixture()
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import throughput

    return throughput


def batches_of(*sizes: int) -> list:
    """A stand-in loader: one (images, indices) pair per batch, of these sizes."""
    return [(None, list(range(size))) for size in sizes]


def test_a_partial_batch_inside_a_timed_window_is_refused(throughput):
    """The official-style pipeline once timed its smaller last batch (1,000 images: 62 of 16 and one of 8) inside the
    window, where under cudnn.benchmark its new shape re-timed every convolution: the helper must not time it."""
    loader = batches_of(16, 16, 8)
    with pytest.raises(
        throughput.PartialBatchError, match="a batch of 8 images inside a timed window of batches of 16"
    ):
        throughput.measure(loader, lambda batch: None, torch.device("cpu"), 3, 16)


def test_the_warm_up_is_one_full_pass_and_only_full_batches_are_timed(throughput):
    seen = []
    loader = batches_of(16, 16, 16)
    rate = throughput.measure(loader, lambda batch: seen.append(len(batch[1])), torch.device("cpu"), 5, 16)
    assert rate > 0
    assert seen == [16] * (3 + 5)  # the whole loader once (the warm-up), then 5 timed batches, cycling it
    seen.clear()
    # a smaller last batch is fine in the warm-up pass, and outside the window
    throughput.measure(batches_of(16, 16, 8), lambda batch: seen.append(len(batch[1])), torch.device("cpu"), 2, 16)
    assert seen == [16, 16, 8, 16, 16]


def test_the_official_style_side_runs_without_cudnn_benchmark_and_this_project_with_it(throughput, monkeypatch):
    torch.backends.cudnn.benchmark = True
    seen = []

    def prepare(batch):
        seen.append(torch.backends.cudnn.benchmark)
        return batch[0]

    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True)
    model = models.build_model("smallcnn", throughput.NUM_CLASSES, use_pretrained=False)
    args = type("Args", (), {"batches": 2, "bsize": 4})()
    amp = throughput._no_amp
    throughput.run_pipeline("official-style", loader, prepare, model, torch.device("cpu"), amp, args, benchmark=False)
    throughput.eval_throughput(model, loader, prepare, torch.device("cpu"), amp, args, benchmark=False)
    assert seen and not any(seen)
    assert torch.backends.cudnn.benchmark is True  # put back
    seen.clear()
    throughput.run_pipeline("project", loader, prepare, model, torch.device("cpu"), amp, args, benchmark=True)
    assert seen and all(seen)


def test_the_gpu_check_times_the_official_style_side_fairly(monkeypatch, tmp_path):
    """gpu_check's official-style measurement: its last batch dropped, cudnn.benchmark off (stand-in measurements:
    nothing trains)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    calls = []

    def fake_pipeline(name, loader, prepare, model, device, amp, args, *, benchmark):
        calls.append(("train", loader.drop_last, benchmark))
        return {"train_img_s": 1.0, "data_img_s": 2.0}

    def fake_eval(model, loader, prepare, device, amp, args, *, benchmark):
        calls.append(("eval", loader.drop_last, benchmark))
        return 3.0

    monkeypatch.setattr(gpu_check.throughput, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(gpu_check.throughput, "eval_throughput", fake_eval)
    out = gpu_check.official_style([str(tmp_path / "a.jpg")], torch.device("cpu"))
    assert calls == [("train", True, False), ("eval", True, False)]
    assert out["cudnn_benchmark"] is False and out["train_img_s"] == 1.0 and out["eval_img_s"] == 3.0


def test_arch_reaches_the_model_builder_as_given(throughput, monkeypatch):
    """--arch is forwarded untouched (a timm name included) to models.build_model, as main.py forwards it."""
    calls = []
    monkeypatch.setattr(throughput.models, "build_model", lambda *a, **k: calls.append((a, k)) or "model")
    assert throughput.build_model("timm:convnext_base.fb_in22k_ft_in1k", 80) == "model"
    assert calls == [(("timm:convnext_base.fb_in22k_ft_in1k", 80), {"use_pretrained": False})]
