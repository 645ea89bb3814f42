"""The fast paths change nothing the model sees: decoded or cached pixels equal PIL's, the disk cache resumes after
an interruption and refuses a short disk, bf16 and fp32 select the same entries; the throughput benchmark runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torchvision import transforms

import datasets
import loaders
import losses
import resize


@pytest.fixture()
def odd_images(tmp_path):
    """JPEG, grayscale JPEG, CMYK JPEG, PNG with alpha, palette PNG; odd sizes."""
    rng = np.random.default_rng(0)
    specs = [("RGB", (37, 23), "jpg"), ("L", (50, 64), "jpg"), ("CMYK", (31, 45), "jpg"), ("RGBA", (20, 20), "png"),
             ("P", (41, 17), "png")]  # fmt: skip
    names = []
    for i, (mode, size, ext) in enumerate(specs):
        channels = {"L": 1, "P": 1, "RGB": 3, "CMYK": 4, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(array[..., 0] if channels == 1 else array, mode="L" if mode == "P" else mode)
        image = image.convert("P") if mode == "P" else image
        image.save(tmp_path / f"{i}.{ext}")
        names.append(f"{i}.{ext}")
    return datasets.Split(str(tmp_path), np.array(names), None, None)


def pil_pixels(path: str, size: int) -> np.ndarray:
    """The paper's path up to ToTensor: PIL open, convert RGB, torchvision Resize((size, size))."""
    with Image.open(path) as raw:
        return np.asarray(transforms.Resize((size, size))(raw.convert("RGB")))


@pytest.mark.parametrize("size", [16, 29])
def test_decoded_and_cached_pixels_equal_the_pil_path(odd_images, tmp_path, size):
    cache = loaders.build_disk_cache(odd_images, size, tmp_path / "cache" / f"c{size}.u8", num_workers=2)
    decoded = loaders.ImageDataset(odd_images, size)
    cached = loaders.ImageDataset(odd_images, size, cache)
    for i in range(len(odd_images)):
        reference = pil_pixels(odd_images.image_path(i), size)
        for dataset in (decoded, cached):
            image, index = dataset[i]
            assert index == i and image.dtype == torch.uint8
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), reference)


def test_an_interrupted_cache_build_resumes_where_it_stopped(odd_images, tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "_CACHE_CHUNK", 2)
    decoded = []
    real_load = loaders.load_image
    monkeypatch.setattr(loaders, "load_image", lambda p, s: decoded.append(p) or real_load(p, s))
    path = tmp_path / "cache.u8"

    def interrupt(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loaders.build_disk_cache(odd_images, 12, path, num_workers=0, on_chunk=interrupt)
    assert len(decoded) == 2 and not loaders.disk_cache_complete(path, len(odd_images), 12)
    loaders.build_disk_cache(odd_images, 12, path, num_workers=0)
    assert len(decoded) == len(odd_images)  # the first chunk was not decoded again
    assert loaders.disk_cache_complete(path, len(odd_images), 12)
    pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(odd_images), 12, 12, 3))
    for i in range(len(odd_images)):
        np.testing.assert_array_equal(pixels[i], pil_pixels(odd_images.image_path(i), 12))


def test_the_cache_announces_its_size_and_refuses_a_short_disk(odd_images, tmp_path, monkeypatch, capsys):
    class Usage:
        free = 10_000

    monkeypatch.setattr(loaders.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(datasets.DataError, match="needs 0.00 GB .* only 0.00 GB are free"):
        loaders.build_disk_cache(odd_images, 64, tmp_path / "cache.u8", num_workers=0)
    assert "disk cache: 5 images x 64x64x3" in capsys.readouterr().out
    assert not (tmp_path / "cache.u8").exists()


def test_bf16_logits_are_ranked_in_fp32():
    # Logits near 0 (+- 0.01): as bf16 values they are distinct, but their BCE losses (about 0.69) computed in bf16
    # tie in many places and rank differently. large_loss must cast to fp32 first and select what fp32 selects.
    gen = torch.Generator().manual_seed(0)
    logits = (0.01 * torch.randn(16, 20, generator=gen)).bfloat16()
    observed = torch.zeros(16, 20, dtype=torch.long)
    observed[torch.arange(16), torch.randint(0, 20, (16,), generator=gen)] = 1
    unobserved = observed == 0
    for scheme in ("LL-R", "LL-Ct", "LL-Cp"):
        for rate in (0.05, 0.2):
            fp32 = losses.large_loss(logits.float(), observed, scheme, rate)
            bf16 = losses.large_loss(logits, observed, scheme, rate)
            assert torch.equal(fp32[1], bf16[1]), (scheme, rate)
            assert bf16[0].dtype == torch.float32
            # the case can tell: ranked by losses computed in bf16, the selection would differ
            k = losses.num_to_select(16, 20, rate)
            in_bf16 = torch.where(unobserved, torch.nn.functional.softplus(logits), -1).flatten().topk(k).indices
            ranked_in_bf16 = torch.zeros(320, dtype=torch.bool).index_fill(0, in_bf16, True).view(16, 20)
            assert not torch.equal(ranked_in_bf16, fp32[1])


def test_bf16_autocast_model_selects_like_fp32_on_a_separated_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 20)
    x = torch.randn(16, 8) * 4
    observed = torch.zeros(16, 20, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = model(x)
    assert bf16_logits.dtype == torch.bfloat16
    fp32_logits = model(x)
    selected_bf16 = losses.large_loss(bf16_logits, observed, "LL-R", 0.02)[1]
    selected_fp32 = losses.large_loss(fp32_logits, observed, "LL-R", 0.02)[1]
    # the 7 largest of 320 losses are far apart from the 8th here, so rounding cannot swap them
    top = torch.nn.functional.softplus(fp32_logits).flatten().sort(descending=True).values
    assert top[6] - top[7] > 0.1
    assert torch.equal(selected_bf16, selected_fp32)


@pytest.mark.slow  # runs main.py or several processes
def test_throughput_benchmark_small_prints_both_pipelines_and_the_ratio():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "throughput.py"), "--small", "--images", "64", "--batches", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for pipeline in ("official", "project", "project_disk_cache"):
        assert result[pipeline]["train_img_s"] > 0 and result[pipeline]["data_img_s"] > 0
    assert result["model_alone"]["train_img_s"] > 0 and result["official"]["eval_img_s"] > 0
    assert result["ratio_train"] == pytest.approx(
        result["project"]["train_img_s"] / result["official"]["train_img_s"], rel=0.02
    )


@pytest.mark.slow  # a process of its own (it sets torch to one thread)
def test_eval_resize_benchmark_small_prints_both_ways_and_the_ratio():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "eval_resize_cpu.py"), "--small"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ms = result["ms_per_image"]
    assert ms["workers"] > 0 and ms["device"] > 0
    assert result["ratio_device_vs_workers"] == pytest.approx(ms["device"] / ms["workers"], abs=0.002)


@pytest.mark.slow  # about 30 s: three tiny main.py runs, one of them compiled
def test_gpu_check_small_runs_every_step_and_prints_the_keys(tmp_path):
    """The prepared GPU check, tiny, on a CPU: every step runs and the JSON has the keys the GPU note quotes."""
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "PY": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("train_img_s", "eval_img_s", "train_fed_img_s", "eval_fed_img_s", "eval_fed_same_stream_img_s",
                "train_fused_adam_img_s", "train_foreach_adam_img_s"):  # fmt: skip
        assert out["roof"][key] > 0
    assert {"train_copy_side_stream_vs_same", "eval_copy_side_stream_vs_same", "train_fused_adam_vs_foreach"} <= out[
        "ratios"
    ].keys()
    assert out["official_style"]["train_img_s"] > 0
    for run in ("main_py", "main_py_eager"):
        assert {"train_img_s", "eval_img_s", "val_img_s", "test_img_s", "first_epoch_s"} <= out[run].keys()
    assert out["main_py"]["fast_step"] == "eager"  # no CUDA graph on a CPU
    assert out["data_path"]["channels_last_on_device"] is True and out["data_path"]["predict_img_s"] > 0
    assert out["data_path"]["pass_order"] in resize.PASS_ORDERS and out["data_path"]["device_resize_same_pixels"]
    assert out["data_path"]["device_resize_img_s"] > 0 and out["data_path"]["predict_device_resize_img_s"] > 0
    assert out["data_path"]["device_resize_only_img_s"] > 0
    assert out["main_py_eager"]["eval_resize"] == "device"
    assert {"eval_device_resize_vs_workers", "predict_device_resize_vs_workers"} <= out["ratios"].keys()
    projections = {"project_device_resize", "project_compile_device_resize", "project_fill_per_pass"}
    assert projections <= out["coco_run_minutes"].keys()
    assert out["main_py"]["fill_s"].keys() == {"train", "val", "test"}
    assert out["main_py"]["train_steady_img_s"] >= out["main_py"]["train_img_s"] > 0
    assert out["main_py"]["eval_steady_img_s"] >= out["main_py"]["eval_img_s"] > 0
    assert {"train_img_s", "warmup_s"} <= out["main_py_compile"].keys()
    ratios = {"train_vs_roof", "train_vs_official", "compile_train_vs_official", "eval_vs_limit"}
    assert ratios | {"eval_steady_vs_limit"} <= out["ratios"].keys()
    assert {"project", "project_eager", "project_compile", "official_style"} <= out["coco_run_minutes"].keys()
    assert out["main_py"]["epochs_run"] == 2 and out["main_py_compile"]["epochs_run"] == 2


@pytest.mark.slow  # a process of its own (the small check's settings are read at import)
def test_gpu_check_records_a_failed_device_resize_and_goes_on(tmp_path):
    """If the device resize fails on the GPU machine (an operator its torch lacks), the data path records the error,
    keeps the workers' rates, and main.py's runs go on without the flag."""
    driver = f"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {str(REPO / "bench")!r})
import resize
def fail(self):
    raise RuntimeError("no kernel for this here\\nsecond line")
resize.DecodedBatch.resize = fail
import gpu_check, throughput
paths = throughput.make_jpegs_named(Path({str(tmp_path)!r}), [f"{{i}}.jpg" for i in range(20)], 64, 48)
print(json.dumps(gpu_check.data_path_rate(paths, torch.device("cpu"))))
"""
    env = {**os.environ, "GPU_CHECK_SMALL": "1"}
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device_resize_error"] == "RuntimeError: no kernel for this here" and out["predict_img_s"] > 0
    assert "device_resize_same_pixels" not in out


def test_gpu_check_repeats_a_failed_device_resize_run_without_it(tmp_path, monkeypatch):
    """The eager main.py run takes --eval_resize device only when the data path showed the same pixels, and if it
    fails with it, the failure is recorded and the run repeated without it (stand-in runs: no main.py starts)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    calls = []

    def fake_main_py(data_root, save, name, *extra, required=True, timeout=420):
        calls.append((name, extra, required))
        return {"error": "boom"} if "device" in extra else {"train_img_s": 1.0}

    monkeypatch.setattr(gpu_check, "main_py", fake_main_py)
    same = {"data_path": {"device_resize_same_pixels": True}}
    result = gpu_check.main_py_eager(tmp_path, tmp_path / "runs", same, "--device", "cpu")
    assert result == {"train_img_s": 1.0, "device_resize_run_error": "boom", "eval_resize": "workers"}
    assert [(name, "device" in extra, required) for name, extra, required in calls] == [
        ("eager", True, False),
        ("eager_workers", False, True),
    ]
    calls.clear()
    for data_path in ({"device_resize_same_pixels": False}, {"device_resize_error": "RuntimeError: x"}):
        result = gpu_check.main_py_eager(tmp_path, tmp_path / "runs", {"data_path": data_path}, "--device", "cpu")
        assert result["eval_resize"] == "workers" and "device_resize_run_error" not in result
    assert [("device" in extra, required) for _, extra, required in calls] == [(False, True), (False, True)]


def test_gpu_check_candidates_leave_the_check_as_they_found_it(monkeypatch):
    """The candidates' timings: a fused Adam that cannot be built is recorded, not raised; the copy toggle is put back
    to what it was, even when a step fails; each variant is timed in turn (stand-in steps: nothing trains)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    adam = torch.optim.Adam

    def no_fused(params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused=True needs CUDA here\nmore")
        return adam(params, *args, **kwargs)

    monkeypatch.setattr(gpu_check.torch.optim, "Adam", no_fused)
    model = torch.nn.Linear(2, 2)
    out = gpu_check.fused_adam_rates("train", lambda a: None, model, torch.device("cpu"))
    assert out == {"train_fused_adam_error": "RuntimeError: fused=True needs CUDA here"}

    seen = []
    assert gpu_check.copy_stream_rates("x", lambda: seen.append(loaders.SIDE_STREAM_COPIES), torch.device("cpu"), 1)
    assert loaders.SIDE_STREAM_COPIES is True and {True, False} == set(seen)

    def fails():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loaders, "SIDE_STREAM_COPIES", False)
    with pytest.raises(RuntimeError):
        gpu_check.copy_stream_rates("x", fails, torch.device("cpu"), 1)
    assert loaders.SIDE_STREAM_COPIES is False


@pytest.mark.slow  # one main.py start (it stops at its arguments)
def test_gpu_check_records_a_failed_optional_run_and_goes_on(tmp_path, monkeypatch):
    """The --compile run is optional in the GPU check: if it fails or runs out of time, that is its result, not the
    check's end."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    result = gpu_check.main_py(tmp_path, tmp_path / "runs", "bad", "--cuda_graph", "sometimes", required=False)
    assert "error" in result and "sometimes" in result["error"]
    result = gpu_check.main_py(tmp_path, tmp_path / "runs", "slow", required=False, timeout=1)  # starting takes longer
    assert result == {"error": "stopped after 1 s"}


def test_gpu_check_fits_the_compile_run_into_its_budget(monkeypatch):
    """The check is one command of at most 6 minutes on the GPU machine: the --compile run gets what is left once the
    end phase is set aside, never more than its own cap, and is left out when too little is left."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    budget, end = 350.0, gpu_check.END_S
    assert gpu_check.compile_timeout(0.0, budget) == int(gpu_check.COMPILE_S)  # early: the cap
    assert gpu_check.compile_timeout(170.0, budget) == int(budget - 170.0 - end)  # run 3's pace: what is left
    left_out = budget - end - gpu_check.MIN_COMPILE_S + 1.0
    assert gpu_check.compile_timeout(left_out, budget) is None
    assert gpu_check.compile_timeout(left_out - 2.0, budget) is not None
