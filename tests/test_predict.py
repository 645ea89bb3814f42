"""predict.py (labels of new images from a run's best model) and cam.py's handling of bad runs and flags.

One tiny synthetic run is trained once for the module; every test reuses it (copies where a test alters files).
"""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_main
from PIL import Image

import datasets
import models
import predict


@pytest.fixture(scope="module")
def names(synthetic_root) -> list[str]:
    return datasets.class_names("synthetic", synthetic_root)


@pytest.fixture(scope="module")
def run_dir(synthetic_root, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("predict_runs")
    run_main("--data_root", str(synthetic_root), "--save_path", str(save), "--exp_name", "p", "--num_epochs", "1",
            "--ss_frac_train", "0.05", "--num_workers", "0")  # fmt: skip
    return save / "p"


@pytest.fixture(scope="module")
def images(synthetic_root, tmp_path_factory) -> Path:
    """Five synthetic test images, two of them in a subfolder (one with an upper-case extension), and a text file."""
    folder = tmp_path_factory.mktemp("predict_images")
    (folder / "sub").mkdir()
    source = synthetic_root / "images" / "test"
    for i, target in enumerate(["a.png", "b.png", "c.png", "sub/d.png", "sub/E.PNG"]):
        shutil.copy(source / f"test_{i:06d}.png", folder / target)
    (folder / "notes.txt").write_text("not an image")
    return folder


def expected_probs(run_dir: Path, files: list[Path]) -> dict[str, np.ndarray]:
    """Scores computed independently of predict.py: PIL resize, ImageNet normalisation by hand, the saved weights."""
    cfg = json.loads((run_dir / "config.json").read_text())
    model = models.build_model(cfg["arch"], 16, use_pretrained=False, boostlu_alpha=cfg["boostlu_alpha"])
    model.load_state_dict(torch.load(run_dir / "bestmodel.pt", weights_only=True)["model"])
    size = cfg["image_size"]
    pixels = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32) for f in files]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    x = (x - mean) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = torch.sigmoid(model.eval()(x)).numpy()
    return {str(f): p for f, p in zip(files, probs, strict=True)}


def call(capsys, *args) -> tuple[int, str, str]:
    """``predict.main`` in this process (an exception escaping it fails the test): exit status, stdout, stderr."""
    try:
        code = predict.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def cli(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------------------------
# Selection and formats: hand-computed, no model.


def test_select_labels_threshold_top_k_and_both():
    probs = torch.tensor([0.9, 0.5, 0.2, 0.7], dtype=torch.float64)
    names = ["a", "b", "c", "d"]
    assert predict.select_labels(probs, names) == [("a", 0.9), ("d", 0.7), ("b", 0.5)]  # >= 0.5
    assert predict.select_labels(probs, names, threshold=0.6) == [("a", 0.9), ("d", 0.7)]
    assert [n for n, _ in predict.select_labels(probs, names, top_k=3)] == ["a", "d", "b"]
    assert [n for n, _ in predict.select_labels(probs, names, top_k=4)] == ["a", "d", "b", "c"]  # below 0.5 too
    assert [n for n, _ in predict.select_labels(probs, names, top_k=3, threshold=0.6)] == ["a", "d"]


def test_csv_has_a_row_per_label_and_one_for_an_image_without_labels():
    text = predict.format_predictions([("x.png", [("cat", 0.91), ("dog", 0.5)]), ("y.png", [])], "csv")
    assert list(csv.reader(io.StringIO(text))) == [
        ["path", "label", "probability"], ["x.png", "cat", "0.910000"], ["x.png", "dog", "0.500000"], ["y.png", "", ""]
    ]  # fmt: skip
    assert json.loads(predict.format_predictions([("y.png", [])], "json")) == [{"path": "y.png", "labels": []}]


def test_config_from_saved_fills_missing_fields_and_ignores_unknown_ones():
    saved = {"dataset": "synthetic", "data_root": "/gone", "future_setting": 3}
    cfg = predict.config_from_saved(saved)
    assert (cfg.arch, cfg.image_size, cfg.boostlu_alpha, cfg.data_root) == ("smallcnn", 32, 0.0, "/gone")


# ---------------------------------------------------------------------------------------------------------------------
# The trained run.


@pytest.mark.slow
def test_folder_is_searched_recursively_and_scores_equal_the_models(run_dir, images, names):
    """Every label at threshold 0, in the json format, through worker processes and two batches."""
    proc = cli("predict.py", run_dir, images, "--threshold", "0", "--format", "json", "--batch_size", "3",
               "--num_workers", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() == ".png")
    assert sorted(r["path"] for r in rows) == sorted(map(str, files)) and len(files) == 5  # no notes.txt
    expected = expected_probs(run_dir, files)
    for row in rows:
        probs = [label["probability"] for label in row["labels"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 16
        got = {label["label"]: label["probability"] for label in row["labels"]}
        np.testing.assert_allclose([got[n] for n in names], expected[row["path"]], atol=2e-6)


@pytest.mark.slow
def test_top_k_gives_exactly_k_highest_labels_in_csv(run_dir, images, names, capsys):
    code, out, _ = call(capsys, run_dir, images / "sub", "--top_k", "3", "--num_workers", "0")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    files = [images / "sub" / "E.PNG", images / "sub" / "d.png"]
    expected = expected_probs(run_dir, files)
    assert [r["path"] for r in rows] == [str(f) for f in files for _ in range(3)]
    for f in files:
        top = np.argsort(-expected[str(f)])[:3]
        got = [(r["label"], float(r["probability"])) for r in rows if r["path"] == str(f)]
        assert [name for name, _ in got] == [names[c] for c in top]
        np.testing.assert_allclose([p for _, p in got], expected[str(f)][top], atol=2e-6)


@pytest.mark.slow
def test_threshold_keeps_exactly_the_labels_at_or_above_it(run_dir, images, names, capsys):
    files = [images / "a.png", images / "b.png"]
    expected = expected_probs(run_dir, files)
    threshold = float(np.median(np.concatenate(list(expected.values()))))
    code, out, _ = call(capsys, run_dir, *files, "--threshold", threshold, "--format", "json", "--num_workers", "0")
    assert code == 0
    rows = json.loads(out)
    assert [r["path"] for r in rows] == list(map(str, files))
    for row in rows:
        want = sorted((p, names[c]) for c, p in enumerate(expected[row["path"]]) if p >= threshold)[::-1]
        assert [label["label"] for label in row["labels"]] == [name for _, name in want]
    assert 0 < sum(len(r["labels"]) for r in rows) < 32
    code, out, err = call(capsys, run_dir, *files, "--threshold", "1", "--num_workers", "0")
    assert code == 0 and out.splitlines()[1:] == [f"{f},," for f in files]  # no label: one row with both empty
    assert "note: 2 of 2 images have no label with probability >= 1 (a lower --threshold, or --top_k K" in err


@pytest.mark.slow
def test_output_file_is_written_and_stdout_stays_empty(run_dir, images, tmp_path, capsys):
    out_file = tmp_path / "pred.csv"
    code, out, err = call(capsys, run_dir, images, "--top_k", "2", "--output", out_file, "--num_workers", "0")
    assert code == 0 and out == "" and "wrote predictions for 5 images" in err
    rows = list(csv.DictReader(out_file.open()))
    assert len(rows) == 10 and {r["path"] for r in rows} == {str(p) for p in images.rglob("*.*") if p.suffix != ".txt"}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_unreadable_files_are_skipped_and_counted(run_dir, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(images / "sub", folder)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a jpeg")
    code, out, err = call(capsys, run_dir, folder, "--top_k", "1", "--num_workers", "0")
    assert code == 0
    assert [r["path"] for r in csv.DictReader(io.StringIO(out))] == [str(folder / "E.PNG"), str(folder / "d.png")]
    assert "skipped 2 unreadable files, e.g." in err and "empty.png" in err


@pytest.mark.slow
def test_older_config_without_some_fields_and_a_vanished_data_root_still_predicts(
    run_dir, images, names, tmp_path, capsys
):
    code, reference, _ = call(capsys, run_dir, images, "--top_k", "4", "--format", "json", "--num_workers", "0")
    assert code == 0
    run = copy_run(run_dir, tmp_path)
    values = json.loads((run / "config.json").read_text())
    for name in ("arch", "image_size", "boostlu_alpha", "precision", "from_preset"):
        del values[name]
    values["data_root"] = str(tmp_path / "deleted_data")
    values["a_future_setting"] = 1
    (run / "config.json").write_text(json.dumps(values))
    code, out, _ = call(capsys, run, images, "--top_k", "4", "--format", "json", "--num_workers", "0")
    assert code == 0
    numbered = {name: f"class {i}" for i, name in enumerate(names)}  # the names live in the vanished data root
    expected = json.loads(reference)
    for row in expected:
        for label in row["labels"]:
            label["label"] = numbered[label["label"]]
    assert json.loads(out) == expected


@pytest.mark.slow
def test_a_run_without_config_json_uses_the_config_saved_in_bestmodel(run_dir, images, tmp_path, capsys):
    code, reference, _ = call(capsys, run_dir, images, "--top_k", "2", "--num_workers", "0")
    run = copy_run(run_dir, tmp_path)
    (run / "config.json").unlink()
    code, out, _ = call(capsys, run, images, "--top_k", "2", "--num_workers", "0")
    assert code == 0 and out == reference


def _tamper_garbage(run: Path) -> None:
    (run / "bestmodel.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")


def _tamper_pickle(run: Path) -> None:  # an object weights_only refuses to build
    torch.save({"model": {}, "payload": subprocess.CompletedProcess(["x"], 0)}, run / "bestmodel.pt")


def _tamper_other_arch(run: Path) -> None:  # a ResNet-18's weights with the right number of classes
    torch.save({"model": models.build_model("resnet18", 16, use_pretrained=False).state_dict()}, run / "bestmodel.pt")


def _tamper_other_classes(run: Path) -> None:
    torch.save({"model": models.build_model("smallcnn", 20, use_pretrained=False).state_dict()}, run / "bestmodel.pt")


def _tamper_nan(run: Path) -> None:  # readable, the right shapes, and NaN: every score would be NaN
    best = torch.load(run / "bestmodel.pt", weights_only=True)
    best["model"]["head.weight"][0, 0] = float("nan")
    torch.save(best, run / "bestmodel.pt")


def _remove_best(run: Path) -> None:
    (run / "bestmodel.pt").unlink()


def _bad_config(run: Path) -> None:
    (run / "config.json").write_text("{not json")


def _text_in_config(run: Path) -> None:  # hand-edited: a string where a number belongs
    values = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**values, "image_size": "abc"}))


@pytest.mark.slow
@pytest.mark.parametrize(
    "tamper, message",
    [
        (_remove_best, "no checkpoint yet: the run has not finished an epoch"),
        (_tamper_garbage, "bestmodel.pt cannot be read safely"),
        (_tamper_pickle, "bestmodel.pt cannot be read safely"),
        (_tamper_other_arch, "does not fit the run's model (--arch smallcnn"),
        (_tamper_other_classes, "scores 20 classes but the run's dataset synthetic has 16"),
        (_tamper_nan, "bestmodel.pt holds non-finite weights (NaN or infinity in head.weight)"),
        (_bad_config, "config.json cannot be read"),
        (_text_in_config, "is not a valid config (image_size must be an integer (got 'abc'))"),
    ],
)
def test_a_damaged_run_folder_is_refused_cleanly(run_dir, images, tmp_path, capsys, tamper, message):
    run = copy_run(run_dir, tmp_path)
    tamper(run)
    code, out, err = call(capsys, run, images)
    assert code == 1 and out == "" and message in err


def test_a_bestmodel_this_user_may_not_read_is_called_a_permission_problem(run_dir, images, monkeypatch, capsys):
    real_load = torch.load

    def refuse(path, *args, **kwargs):  # the tests run as root, whom chmod does not stop: the error torch would raise
        if Path(path).name == "bestmodel.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", refuse)
    code, out, err = call(capsys, run_dir, images)
    assert code == 1 and out == "" and "permission denied" in err and "not damaged" in err and "chmod u+r" in err


@pytest.mark.slow
def test_bad_paths_and_flags_are_refused_cleanly(run_dir, images, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    (tmp_path / "broken" / "b.jpeg").write_text("x")
    cases = [
        ((tmp_path / "missing_run", images), 1, "does not exist"),
        ((run_dir, tmp_path / "nowhere.png"), 1, "nowhere.png does not exist"),
        ((run_dir, tmp_path / "empty"), 1, "No image files in"),
        ((run_dir, tmp_path / "texts"), 1, "No image files in"),
        ((run_dir, tmp_path / "broken"), 1, "None of the 2 image files could be read"),
        ((run_dir, images, "--output", tmp_path), 1, "is a folder"),
        ((run_dir, images, "--output", tmp_path / "no" / "dir.csv"), 1, "Cannot write --output"),
        ((run_dir, images, "--top_k", "0"), 2, "positive integer"),
        ((run_dir, images, "--top_k", "17"), 2, "only 16 classes"),
        ((run_dir, images, "--threshold", "1.5"), 2, "in [0, 1]"),
        ((run_dir, images, "--format", "xml"), 2, "invalid choice"),
        ((run_dir, images, "--batch_size", str(10**20)), 2, "an integer from 1 to 65536"),
    ]
    for args, status, message in cases:
        code, out, err = call(capsys, *args, "--num_workers", "0")
        assert (code, out) == (status, ""), (args, err)
        assert message in err, (args, err)


@pytest.mark.slow
def test_cli_errors_exit_cleanly_in_a_subprocess(run_dir, images, tmp_path):
    run = copy_run(run_dir, tmp_path)
    _tamper_pickle(run)
    proc = cli("predict.py", run, images)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "cannot be read safely" in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------------------
# cam.py shares the loader.


@pytest.mark.slow
def test_cam_refuses_tampered_and_other_arch_checkpoints_and_bad_flags(run_dir, images, tmp_path, capsys):
    import cam

    image = images / "a.png"
    run = copy_run(run_dir, tmp_path)
    _tamper_pickle(run)
    proc = cli("cam.py", run, image)  # the way users run it: a clean message, no traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "cannot be read safely" in proc.stderr
    proc = cli("cam.py", run_dir, image, "--top", "-1")
    assert proc.returncode == 2 and "positive integer" in proc.stderr
    _tamper_other_arch(run)
    cases = [
        ((run, image), "does not fit the run's model"),
        ((tmp_path / "missing", image), "does not exist"),
        ((run_dir, tmp_path / "missing.png", "--out", tmp_path / "cam"), "missing.png does not exist"),
    ]
    for args, message in cases:  # in this process: an exception escaping cam.main fails the test
        assert cam.main([str(a) for a in args]) == 1
        assert message in capsys.readouterr().err
    assert cam.main([str(run_dir), str(image), "--top", "2", "--out", str(tmp_path / "cam")]) == 0
    assert Image.open(tmp_path / "cam" / "a_cam.png").size == (3 * 256, 276)


def test_device_resize_gives_the_same_scores(run_dir, tmp_path, capsys):
    """--eval_resize device: images of other sizes and orientations than the run's are resized on the device to the
    workers' pixels, so every probability is the same, bit for bit; the CLI takes the flag."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 48), (48, 80), (20, 16), (30, 90), (90, 30)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{i}.{'jpg' if i % 2 else 'png'}"
        )
    (folder / "empty.png").write_bytes(b"")
    run = predict.load_run(run_dir)
    files = predict.find_images([str(folder)])
    workers, bad_w = predict.score_files(run, files, batch_size=3)
    device, bad_d = predict.score_files(run, files, batch_size=3, eval_resize="device", num_workers=2)
    assert bad_w == bad_d and len(bad_d) == 1 and sorted(device) == sorted(workers) and len(device) == 5
    assert all(torch.equal(device[f], workers[f]) for f in files if f in workers)
    code, out, _ = call(capsys, run_dir, folder, "--top_k", "2", "--eval_resize", "device", "--num_workers", "0")
    assert code == 0 and out == call(capsys, run_dir, folder, "--top_k", "2", "--num_workers", "0")[1]
