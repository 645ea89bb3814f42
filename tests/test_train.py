"""The training step: LL-Cp writes its corrections into the trainer's label matrix; a NaN loss stops the run."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datasets
import evaluation
import label_state
import loaders
import losses
import models
import train
import trainstep
from config import parse_config


def tiny_loader(synthetic_root, n=24, bsize=8):
    names = np.array([f"train/train_{i:06d}.png" for i in range(n)])
    split = datasets.Split(str(synthetic_root / "images"), names, np.zeros((n, 16)), np.zeros((n, 16)))
    return torch.utils.data.DataLoader(
        loaders.ImageDataset(split, 32), batch_sampler=loaders.EpochBatches(n, bsize, shuffle=True, seed=0)
    )


def tiny_model():
    torch.manual_seed(0)
    return models.build_model("smallcnn", 16, use_pretrained=False)


def test_ll_cp_updates_the_label_matrix_in_place_with_exactly_the_selected_entries(synthetic_root, monkeypatch):
    initial = np.zeros((24, 16), dtype=np.int8)
    initial[:, 0] = 1
    observed = label_state.DenseLabelStore(initial, torch.device("cpu"))
    selections = []
    real_large_loss = losses.large_loss

    def recording_large_loss(logits, batch_observed, scheme, rate, **kwargs):
        loss, selected = real_large_loss(logits, batch_observed, scheme, rate, **kwargs)
        selections.append((batch_observed.clone(), selected.clone()))
        return loss, selected

    monkeypatch.setattr(losses, "large_loss", recording_large_loss)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = tiny_loader(synthetic_root)
    cfg = parse_config(["--mod_scheme", "LL-Cp", "--exp_name", "x"])
    state = label_state.LabelState(observed)
    stats = train.train_one_epoch(cfg, model, loader, optimizer, state, rate=0.05, epoch=2, device=torch.device("cpu"))
    # ceil(8 * 16 * 0.05) = 7 per batch, 3 batches
    assert stats["num_selected"] == 21 and observed.num_positive() == 24 + 21
    loader.batch_sampler.set_epoch(2)
    for batch_idx, (before, selected) in zip(loader.batch_sampler, selections, strict=True):
        assert (before[selected] == 0).all()  # only unobserved entries were corrected
        assert torch.equal(observed.matrix[batch_idx], before.masked_fill(selected, 1))


def test_non_finite_loss_stops_with_a_clear_message(synthetic_root):
    model = tiny_model()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state = label_state.LabelState(label_state.DenseLabelStore(np.zeros((24, 16), dtype=np.int8), torch.device("cpu")))
    cfg = parse_config(["--mod_scheme", "AN", "--exp_name", "x"])
    with pytest.raises(train.TrainingError, match="NaN or infinite"):
        train.train_one_epoch(cfg, model, tiny_loader(synthetic_root), optimizer, state, rate=0.0, epoch=1,
                              device=torch.device("cpu"))  # fmt: skip


def test_optimizer_gives_the_head_lr_times_lr_mult():
    cfg = parse_config(["--lr", "0.002", "--lr_mult", "10", "--optimizer", "sgd", "--exp_name", "x"])
    optimizer = train.build_optimizer(cfg, tiny_model())
    assert [g["lr"] for g in optimizer.param_groups] == [0.002, 0.02]
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 1e-3


def test_adam_is_fused_on_cuda_only_and_a_resumed_run_keeps_the_implementation_it_saved():
    cuda, host = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert trainstep.fused_adam([{"params": [cuda, cuda]}, {"params": [cuda]}])
    assert not trainstep.fused_adam([{"params": [cuda]}, {"params": [host]}])
    assert not trainstep.fused_adam([{"params": []}])
    # On a CPU the paper's Adam keeps torch's default implementation, so CPU results repeat as before.
    optimizer = train.build_optimizer(parse_config(["--exp_name", "x"]), tiny_model())
    assert [g["fused"] for g in optimizer.param_groups] == [None, None]
    # Parameters given as a generator (model.parameters()) are all kept: deciding on fused must not use them up.
    model = tiny_model()
    optimizer = trainstep.make_optimizer(parse_config(["--exp_name", "x"]), [{"params": model.parameters()}])
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters())) > 0
    # A checkpoint of a fused (CUDA) run resumes fused wherever it resumes, and a default one stays default: the
    # choice travels in the optimiser's state.
    model = tiny_model()
    saved = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    saved.step()
    resumed = torch.optim.Adam(model.parameters(), lr=1e-5)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["fused"] is True
    saved = torch.optim.Adam(model.parameters(), lr=1e-5)
    saved.step()
    resumed = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["fused"] is None


def test_noting_first_batch_times_the_wait_for_the_first_batch_only(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])

    def batches():
        clock[0] += 2.0  # the pipeline's fill
        yield 1
        clock[0] += 3.0  # not part of it
        yield 2

    timings = {}
    assert list(evaluation.noting_first_batch(batches(), timings)) == [1, 2]
    assert timings == {"first_batch_seconds": 2.0}
    empty = {}
    assert list(evaluation.noting_first_batch(iter(()), empty)) == [] and empty == {}
