"""``--eval_resize device``: PIL's bilinear resize reproduced on a torch device, checked pixel for pixel against the
installed Pillow, and the same evaluation as the workers' PIL resize through main.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import drop_timings, read_run, run_main
from fixtures_raw import COCO_IDS_80, make_coco
from PIL import Image

import datasets
import loaders
import resize


def pil_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))


def test_weights_of_a_hand_computed_case():
    # 4 -> 2 pixels: scale 2, support 2, 5 taps. Output pixel 0 is centred at 1.0 and covers inputs 0..2 with the
    # triangle 1 - |x + 0.5 - 1| / 2: 0.75, 0.75, 0.25, normalised by 1.75 and rounded to 22 bits:
    # 3/7 * 2**22 = 1797558.86 -> 1797559, 1/7 * 2**22 = 599186.29 -> 599186. Pixel 1 (centre 3.0) mirrors it.
    first, weights = resize.coefficients(4, 2)
    assert first.tolist() == [0, 1]
    assert weights.tolist() == [[1797559, 1797559, 599186, 0, 0], [599186, 1797559, 1797559, 0, 0]]
    # same size: the identity (weight 1.0 on the pixel itself)
    first, weights = resize.coefficients(3, 3)
    assert first.tolist() == [0, 1, 2] and weights[:, 0].tolist() == [1 << 22] * 3 and weights[:, 1:].sum() == 0


def test_the_installed_pillow_follows_one_known_pass_order():
    assert resize.pass_order() in resize.PASS_ORDERS
    # the rules are told apart: on an image they order differently, only the installed Pillow's gives its pixels
    rules = resize.PASS_ORDERS
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)  # 40 x 64 -> 32 x 32: the rules disagree
    orders = {name: rule(40, 64, 32, 32) for name, rule in rules.items()}
    assert len(set(orders.values())) == 2
    expected = pil_resize(a, 32, 32)
    matches = {
        name: np.array_equal(resize.resize_image(torch.from_numpy(a), 32, 32, v).numpy(), expected)
        for name, v in orders.items()
    }
    assert matches[resize.pass_order()] and sum(matches.values()) == 1


SHAPES = [(640, 480), (480, 640), (500, 375), (375, 500), (37, 23), (1, 1), (28, 28), (29, 27), (300, 40), (40, 300)]


@pytest.mark.parametrize("out", [(28, 28), (48, 48), (35, 20)])
def test_every_pixel_is_pils(out):
    rule = resize.PASS_ORDERS[resize.pass_order()]
    rng = np.random.default_rng(out[0])
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(1, 200, 2)) for _ in range(20)]
    for w, h in shapes:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = resize.resize_image(torch.from_numpy(a), *out, rule(w, h, *out)).numpy()
        assert np.array_equal(got, pil_resize(a, *out)), (w, h, out)


def test_a_pillow_that_resizes_otherwise_is_refused(monkeypatch, synthetic_root, tmp_path):
    """A Pillow whose resize gives other pixels (stand-in: nearest instead of bilinear) matches no rule, and the
    device resize stops with what to do instead of giving other pixels: main.py says so, without a traceback."""
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, resample=None, **kw: real(self, size, Image.NEAREST))
    resize.pass_order.cache_clear()
    try:
        assert resize.pass_order() is None
        with pytest.raises(resize.ResizeUnavailable, match="--eval_resize workers"):
            resize.checked_pass_order()
        args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "r",
                "--num_epochs", "1", "--eval_resize", "device"]  # fmt: skip
        proc = run_main(*args, check=False)
        assert proc.returncode == 1 and "resizes differently" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        monkeypatch.undo()
        resize.pass_order.cache_clear()
    assert resize.pass_order() is not None


def test_padding_groups_keep_padding_bounded():
    assert resize.padding_groups([]) == []
    # a COCO batch: 640x480 and 640x427 (height, width), both orientations: padding to 640x640 costs 1.33x, one group
    assert resize.padding_groups([(480, 640), (427, 640), (640, 480)]) == [[0, 1, 2]]
    # one far larger image gets a group of its own instead of making the others as large
    assert resize.padding_groups([(480, 640), (4000, 3000), (480, 640)]) == [[1], [0, 2]]
    # 16x20 beside two 64x48/48x64: 3 x 64 x 64 = 12,288 padded pixels > 1.5 x 6,464 own pixels
    assert resize.padding_groups([(48, 64), (64, 48), (16, 20)]) == [[0, 1], [2]]


@pytest.fixture()
def mixed_images(tmp_path):
    """JPEGs and PNGs of both orientations, both pass orders, up- and downscaled, and a grayscale one."""
    rng = np.random.default_rng(5)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (20, 16), (30, 90), (90, 30), (24, 24), (41, 77)]):
        mode = "L" if i == 5 else "RGB"
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)
        path = tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_device_resized_batches_are_the_workers_batches(mixed_images, workers):
    size = 32
    n = len(mixed_images)
    split = datasets.Split("", np.array(mixed_images), np.zeros((n, 1)), np.zeros((n, 1)))
    cfg = SimpleNamespace(bsize=4, seed=0, num_workers=workers, image_size=size)
    host = list(loaders.make_loader(split, cfg, train=False, pin_memory=False))
    device = list(loaders.make_loader(split, cfg, train=False, pin_memory=False, eval_resize="device"))
    assert [rows.tolist() for _, rows in device] == [rows.tolist() for _, rows in host] == [[0, 1, 2, 3], [4, 5, 6]]
    for (expected, _), (decoded, _) in zip(host, device, strict=True):
        assert isinstance(decoded, resize.DecodedBatch) and len(decoded) == len(expected)
        assert sorted(len(g["positions"]) for _, g in decoded.groups) != [len(expected)]  # both orders in a batch
        images = loaders.batch_to_device(decoded, torch.device("cpu"))
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, expected)
    # a training split is never decoded only: its flips and the CUDA graph's input are the workers' batches
    train_batch, _ = next(iter(loaders.make_loader(split, cfg, train=True, pin_memory=False, eval_resize="device")))
    assert isinstance(train_batch, torch.Tensor)


def test_device_resize_needs_no_host_read_back(mixed_images):
    from test_sync import SyncCounter

    n = len(mixed_images)
    split = datasets.Split("", np.array(mixed_images), np.zeros((n, 1)), np.zeros((n, 1)))
    cfg = SimpleNamespace(bsize=n, seed=0, num_workers=0, image_size=32)
    (decoded, _), *_ = list(loaders.make_loader(split, cfg, train=False, pin_memory=False, eval_resize="device"))
    counter = SyncCounter(set())
    with counter:
        loaders.batch_to_device(decoded, torch.device("cpu"))
    assert not counter.calls, dict(counter.calls)


def mixed_coco_run(tmp_path) -> list[str]:
    """A COCO fixture tree whose images have other sizes and orientations than the output (both pass orders, up- and
    downscaled), and main.py's arguments for a tiny run on it."""
    root = make_coco(tmp_path / "coco", COCO_IDS_80)
    rng = np.random.default_rng(0)
    sizes = iter([(64, 48), (48, 64), (30, 90), (90, 30), (17, 23)])
    for path in sorted((root / "val2014").glob("*.jpg")) + sorted((root / "train2014").glob("*.jpg")):
        w, h = next(sizes, (40, 30))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return ["--dataset", "coco", "--data_root", str(root), "--save_path", str(tmp_path / "runs"), "--use_pretrained",
            "false", "--arch", "resnet18", "--image_size", "32", "--num_epochs", "2", "--bsize", "2", "--device",
            "cpu"]  # fmt: skip


@pytest.mark.slow  # two main.py runs
def test_main_py_scores_the_same_with_either_resize(tmp_path, monkeypatch):
    """A COCO tree whose test and val images have other sizes and orientations than the output: main.py's results,
    down to every score of every evaluation, are identical with the workers' PIL resize and with the device's."""
    import evaluation

    scores = {"workers": [], "device": []}
    real_predict = evaluation.predict

    def recording_predict(*args, **kwargs):
        out = real_predict(*args, **kwargs)
        scores[current].append(out.clone())
        return out

    monkeypatch.setattr(evaluation, "predict", recording_predict)
    common = mixed_coco_run(tmp_path)
    current = "workers"
    run_main(*common, "--exp_name", "workers", "--num_workers", "0")
    current = "device"
    proc = run_main(*common, "--exp_name", "device", "--num_workers", "2", "--eval_resize", "device")
    assert "--eval_resize device: val and test images resized on cpu" in proc.stdout
    assert "the same pixels as PIL on 4 of them" in proc.stdout  # val 1 + test 3 images, all of distinct sizes
    runs = [read_run(tmp_path / "runs" / name) for name in ("workers", "device")]
    for _, log, final in runs:
        drop_timings(final, *log)
    (cfg_w, log_w, final_w), (cfg_d, log_d, final_d) = runs
    assert cfg_d["eval_resize"] == "device" and cfg_w["eval_resize"] == "workers"
    assert log_d == log_w and final_d == final_w
    assert len(scores["device"]) == len(scores["workers"]) == 3  # val after each epoch, then test
    assert all(torch.equal(d, w) for d, w in zip(scores["device"], scores["workers"], strict=True))


def test_a_rule_that_misses_the_data_is_caught_at_start(tmp_path, monkeypatch):
    """Should the probes ever pass with a rule that gives other pixels on the run's own images (stand-in: the rule
    turned around after the start check), the check on the data's first images of distinct sizes stops the run."""
    name = resize.pass_order()  # the start check, done with the true rule
    rule = resize.PASS_ORDERS[name]
    monkeypatch.setitem(resize.PASS_ORDERS, name, lambda *size: not rule(*size))
    proc = run_main(*mixed_coco_run(tmp_path), "--exp_name", "r", "--eval_resize", "device", check=False)
    assert proc.returncode == 1 and "the device resize gives other pixels than PIL for" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_device_resize_and_the_disk_cache_are_refused_together(tmp_path):
    proc = run_main("--eval_resize", "device", "--cache", "disk", "--save_path", str(tmp_path), check=False)
    assert proc.returncode != 0 and "--eval_resize device has nothing to resize with --cache disk" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_linear_init_features_are_the_same_with_the_device_resize(synthetic_root, tmp_path, monkeypatch):
    """LinearInit's cached features (its own loader) get the device resize too, and the same pixels: 32x32 synthetic
    images upscaled to 40."""
    import linear_init
    import train
    from config import parse_config

    resized = []
    real_resize = resize.DecodedBatch.resize
    monkeypatch.setattr(resize.DecodedBatch, "resize", lambda self: resized.append(len(self)) or real_resize(self))
    features = {}
    for way in ("workers", "device"):
        cfg = parse_config(["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "x",
                            "--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--image_size", "40",
                            "--eval_resize", way, "--cache_dir", str(tmp_path / way)])  # fmt: skip
        data = datasets.build_data(cfg)
        torch.manual_seed(0)
        model = train.build_model(cfg, data.num_classes)
        features[way] = linear_init.cached_features(cfg, model, data.val, torch.device("cpu"))
    assert torch.equal(features["workers"], features["device"])
    assert sum(resized) == len(features["device"])  # every image went through the device resize, once
