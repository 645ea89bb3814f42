"""Several processes: LL's global selection, the shares of a batch, and a real 2-process torchrun run (gloo, CPU)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, read_run

import datasets
import distributed
import loaders
import losses

RATES = (0.01, 0.05, 0.2, 0.6)


def _selection_worker(rank: int, world: int, init_file: str, cases: list, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx = distributed.Context(rank, world, rank)
    out = []
    for loss_matrix, candidates, cut, rate in cases:
        bounds = [0, cut, len(loss_matrix)]
        mine = slice(bounds[rank], bounds[rank + 1])
        rows = torch.arange(len(loss_matrix))[mine]
        select = distributed.GlobalSelection(ctx, len(loss_matrix), rate, rows)
        local = select(loss_matrix[mine], candidates[mine])
        out.append((local, select.global_selected, select.global_rows))
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.slow  # runs main.py or several processes
def test_two_processes_select_exactly_what_one_process_selects(tmp_path):
    gen = torch.Generator().manual_seed(0)
    cases = []
    for rate in RATES:
        for batch, cut in ((16, 8), (16, 11), (7, 2), (5, 4)):  # even and uneven halves
            loss_matrix = torch.rand(batch, 20, generator=gen)  # continuous: no ties
            candidates = torch.rand(batch, 20, generator=gen) > 0.1
            cases.append((loss_matrix, candidates, cut, rate))
    results = mp.Manager().dict()
    mp.spawn(_selection_worker, args=(2, str(tmp_path / "store"), cases, results), nprocs=2, join=True)
    for i, (loss_matrix, candidates, cut, rate) in enumerate(cases):
        expected = losses.select_largest(loss_matrix, candidates, losses.num_to_select(len(loss_matrix), 20, rate))
        local0, global0, rows0 = results[0][i]
        local1, global1, rows1 = results[1][i]
        assert torch.equal(torch.cat([local0, local1]), expected), (i, rate, cut)
        assert torch.equal(global0, expected) and torch.equal(global1, expected)  # LL-Cp: the same on both
        assert rows0.tolist() == rows1.tolist() == list(range(len(loss_matrix)))


def test_shares_of_a_global_batch_keep_its_order_and_pad_empty_ones():
    batch = np.array([7, 3, 9, 1, 4])
    assert [distributed.share(batch, r, 2) for r in range(2)] == [[7, 3, 9], [1, 4]]
    assert sum((distributed.share(batch, r, 3) for r in range(3)), []) == batch.tolist()
    # a last batch of 2 images over 3 processes: the third process gets a padding copy (-1 - row) of the first image
    assert [distributed.share(np.array([5, 8]), r, 3) for r in range(3)] == [[5], [8], [-6]]


def test_epoch_batches_shares_cover_the_single_process_batches():
    single = loaders.EpochBatches(37, 8, shuffle=True, seed=3)
    shares = [loaders.EpochBatches(37, 8, shuffle=True, seed=3, rank=r, world=2) for r in range(2)]
    for sampler in [single, *shares]:
        sampler.set_epoch(4)
    together = [a + b for a, b in zip(*shares, strict=True)]
    assert together == list(single) and shares[0].global_sizes == [8, 8, 8, 8, 5]
    assert torch.equal(shares[1].flips, single.flips)


def test_eval_shares_are_the_split_in_order():
    split = datasets.Split("", np.array([f"{i}.png" for i in range(10)]), None, None)
    parts = [split.share(r, 3) for r in range(3)]
    assert sum((p.image_names.tolist() for p in parts), []) == split.image_names.tolist()
    assert [p.offset for p in parts] == [0, 4, 7] and all(p.whole_size == 10 for p in parts)


TINY = ["--ss_frac_train", "0.05", "--ss_frac_val", "0.2", "--num_epochs", "3", "--device", "cpu", "--num_workers",
        "0", "--mod_scheme", "LL-Cp", "--delta_rel", "5"]  # fmt: skip


@pytest.mark.slow  # runs main.py or several processes
def test_two_process_torchrun_run_matches_one_process(synthetic_root, tmp_path):
    common = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), *TINY]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, str(REPO / "main.py"), *common, "--exp_name", "two"], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(REPO / "main.py"), *common, "--exp_name", "one"], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    _, log2, final2 = read_run(tmp_path / "two")
    _, log1, final1 = read_run(tmp_path / "one")
    assert final2["processes"] == 2 and final2["label_state_identical_on_all_processes"] is True
    assert final2["test_images"] == final1["test_images"] == 1000  # every test image scored exactly once
    # the same global batches and global selection: the same number of entries corrected, epoch by epoch
    assert [r["num_selected"] for r in log2] == [r["num_selected"] for r in log1]
    assert [r["observed_positives"] for r in log2] == [r["observed_positives"] for r in log1]
    # only BatchNorm differs (per-process statistics on CPU): the mAP is within noise
    assert abs(final2["test_map"] - final1["test_map"]) < 5.0
    assert (tmp_path / "two" / "checkpoint.pt").exists() and not list((tmp_path / "two").glob("*.tmp"))
    assert "Traceback" not in two.stderr
    assert json.loads((tmp_path / "two" / "config.json").read_text())["mod_scheme"] == "LL-Cp"


@pytest.mark.parametrize("rate", [0.05])
def test_an_empty_share_gets_zero_weight(rate):
    # the padding row: observed forced to 1 (never a candidate) and row weight 0 -> contributes nothing
    logits = torch.tensor([[3.0, -1.0], [5.0, 5.0]])
    observed = torch.tensor([[0, 0], [1, 1]])
    weight = torch.tensor([[1.0], [0.0]]) / 2
    loss, selected = losses.large_loss(logits, observed, "LL-R", rate, reduce=lambda m: (m * weight).sum())
    single, single_selected = losses.large_loss(logits[:1], observed[:1], "LL-R", rate)
    assert loss.item() == pytest.approx(single.item()) and not selected[1].any()
    assert torch.equal(selected[:1], single_selected)


@pytest.mark.slow  # runs main.py or several processes
def test_torchrun_with_the_default_run_name_makes_one_run_folder(synthetic_root, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--ss_frac_train", "0.02",
            "--ss_frac_val", "0.05", "--num_epochs", "1", "--device", "cpu", "--num_workers", "0"]  # fmt: skip
    proc = subprocess.run([*torchrun, str(REPO / "main.py"), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "final.json").exists()  # the processes agreed on rank 0's name


@pytest.mark.parametrize("loss", ["epr", "role"])
def test_epr_and_role_refuse_several_processes(synthetic_root, tmp_path, monkeypatch, loss):
    import config
    import train

    monkeypatch.setattr(distributed, "setup", lambda use_cuda: distributed.Context(0, 2, 0))
    cfg = config.parse_config(["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--loss", loss])
    with pytest.raises(train.TrainingError, match="runs in a single process"):
        train.run(cfg)


@pytest.mark.parametrize("fails", [False, True])
def test_processes_meet_before_the_group_is_torn_down_only_after_a_run_that_ended_well(monkeypatch, fails):
    """After a finished run every process frees what holds the group and waits for the others before tearing it down;
    after a failure it tears down at once (the others may never reach a barrier)."""
    import train

    calls = []
    monkeypatch.setattr(distributed, "setup", lambda use_cuda: distributed.Context(0, 2, 0))
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed, "teardown", lambda: calls.append("teardown"))

    def run(cfg, ctx):
        if fails:
            raise train.TrainingError("stop")
        return {"test_map": 1.0}

    monkeypatch.setattr(train, "_run", run)
    if fails:
        with pytest.raises(train.TrainingError):
            train.run(SimpleNamespace(device="cpu"))
        assert calls == ["teardown"]
    else:
        assert train.run(SimpleNamespace(device="cpu")) == {"test_map": 1.0}
        assert calls == ["barrier", "teardown"]
