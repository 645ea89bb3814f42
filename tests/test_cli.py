"""The real command line, end to end, on a small subsample of the synthetic dataset."""

import json

import pytest
from conftest import drop_timings, read_run, run_cli, run_main

import registry

pytestmark = pytest.mark.slow  # every test here runs main.py: in this process (run_main), or a subprocess (run_cli)

TINY = ["--ss_frac_train", "0.1", "--ss_frac_val", "0.2", "--num_epochs", "3", "--num_workers", "0"]


def tiny_run(synthetic_root, save_path, name, *extra, check=True):
    args = ["--data_root", str(synthetic_root), "--save_path", str(save_path), "--exp_name", name, *TINY, *extra]
    return run_main(*args, check=check)


SCHEMES = ["AN", "LL-R", "LL-Ct", "LL-Cp"]


@pytest.fixture(scope="module")
def scheme_runs(synthetic_root, tmp_path_factory):
    """One tiny run per scheme, shared by the tests below: scheme -> (run folder, its completed process). delta_rel 5
    (percent): large enough that the tiny run selects entries from epoch 2 on (AN takes none: it has no rate)."""
    save = tmp_path_factory.mktemp("schemes")
    rate = {s: () if s == "AN" else ("--delta_rel", "5") for s in SCHEMES}
    return {s: (save / s, tiny_run(synthetic_root, save, s, "--mod_scheme", s, *rate[s])) for s in SCHEMES}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_runs_and_writes_its_run_folder(scheme_runs, scheme):
    run_dir = scheme_runs[scheme][0]
    config, log, final = read_run(run_dir)
    assert config["mod_scheme"] == scheme and config["delta_rel"] == (0.0 if scheme == "AN" else 5.0)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert {"rate", "train_loss", "num_selected", "val_map", "seconds"} <= set(log[0])
    # each pass's fill (how long its first batch took to come), apart from its rate: read by bench/gpu_check.py
    assert all(0 <= r["train_first_batch_seconds"] <= r["train_seconds"] for r in log)
    assert all(0 <= r["val_first_batch_seconds"] <= r["val_seconds"] for r in log)
    assert 0 <= final["test_first_batch_seconds"] <= final["test_seconds"]
    assert log[0]["num_selected"] == 0  # epoch 1 is never modified
    if scheme == "AN":
        assert all(r["num_selected"] == 0 for r in log)
    else:
        assert log[1]["num_selected"] > 0
    assert (run_dir / "bestmodel.pt").exists()
    assert 1 <= final["best_epoch"] <= 3 and 0 < final["test_map"] <= 100
    assert len(final["test_ap_per_class"]) == 16


def test_ll_cp_corrections_persist_into_later_epochs(scheme_runs):
    _, log, _ = read_run(scheme_runs["LL-Cp"][0])
    # observed_positives is counted at the start of each epoch: epoch 2's corrections are there in epoch 3
    assert log[1]["observed_positives"] == log[0]["observed_positives"]
    assert (
        log[2]["observed_positives"]
        == log[1]["observed_positives"] + log[1]["num_selected"]
        > log[1]["observed_positives"]
    )


def test_ll_ct_corrections_are_temporary(scheme_runs):
    _, log, _ = read_run(scheme_runs["LL-Ct"][0])
    assert len({r["observed_positives"] for r in log}) == 1


def test_clean_labels_run(synthetic_root, tmp_path):
    tiny_run(synthetic_root, tmp_path, "clean", "--train_set_variant", "clean")
    config, log, _ = read_run(tmp_path / "clean")
    assert config["mod_scheme"] == "AN"
    assert log[0]["observed_positives"] > 400  # every true positive is observed (2.5 per image on 400 images)


def test_same_seed_same_results(synthetic_root, scheme_runs, tmp_path):
    tiny_run(synthetic_root, tmp_path, "again", "--mod_scheme", "LL-R", "--delta_rel", "5")
    _, log_a, final_a = read_run(scheme_runs["LL-R"][0])
    _, log_b, final_b = read_run(tmp_path / "again")
    drop_timings(*log_a, *log_b, final_a, final_b)
    assert log_a == log_b and final_a == final_b


def test_existing_run_folder_is_never_overwritten(synthetic_root, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    proc = tiny_run(synthetic_root, tmp_path, "taken", check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


def test_missing_data_gives_a_clear_message(tmp_path):
    proc = run_cli(
        "--dataset", "coco", "--data_root", str(tmp_path / "nothing"), "--save_path", str(tmp_path), check=False
    )
    assert proc.returncode == 1
    assert "data/README.md" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.glob("coco_*"))  # no run folder is left behind


def test_missing_imagenet_weights_offline_give_a_clear_message(synthetic_root, tmp_path):
    # An empty TORCH_HOME and an unreachable proxy: the download cannot happen, on any machine.
    env = {
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "w", *TINY]
    proc = run_cli(*args, "--arch", "resnet18", "--image_size", "32", env=env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "resnet18-f37072fd.pth" in proc.stderr and "--use_pretrained false" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flag_is_an_argparse_error_not_a_traceback(tmp_path):
    proc = run_cli("--bsize", "0", "--save_path", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--bsize" in proc.stderr and "Traceback" not in proc.stderr


def test_config_json_is_the_printed_config(scheme_runs):
    run_dir, proc = scheme_runs["AN"]
    config = json.loads((run_dir / "config.json").read_text())
    assert "lr                 0.001   (preset)" in proc.stdout
    names = proc.stdout.split("recorded in config.json, not used by this run: ")[1].split("\nimages:")[0]
    unused = [name.strip() for name in names.split(",")]
    assert "delta_rel" in unused and "em_alpha" in unused  # an AN run: only the methods' settings it does not use
    assert set(unused) <= {*registry.flags(), "pretrained_weights"}
    for key in config:  # every setting is printed, or named as not used
        assert key == "from_preset" or key in unused or f"\n  {key:18s} " in proc.stdout, key
    assert config["from_preset"] and "lr" in config["from_preset"]
