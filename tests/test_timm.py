"""timm backbones (--arch timm:NAME): names, feature maps, normalisation, weights files, refusals, the report, and
tiny models (random weights) end to end on the synthetic data."""

import importlib.util
import json
import shutil

import pytest
import timm
import torch
from conftest import read_run, run_main

import cam
import config
import loaders
import models
import predict
import report

TINY = ["--ss_frac_train", "0.05", "--ss_frac_val", "0.1", "--num_workers", "0", "--use_pretrained", "false"]


def test_names_are_checked_and_the_builtin_names_keep_their_meaning():
    assert models.arch_problem("resnet50") is None and models.arch_problem("timm:convnext_base.fb_in22k") is None
    assert "timm:convnext_base" in models.arch_problem("convnext_base")  # a bare timm name: the prefix is suggested
    assert models.arch_problem("timm:") is not None
    with pytest.raises(models.ArchError, match="has no model 'no_such_net'.*list_models"):
        models.check_arch("timm:no_such_net", 32)
    with pytest.raises(models.ArchError, match="Invalid pretrained tag"):
        models.check_arch("timm:convnext_base.no_such_tag", 32)
    resnet = models.build_model("resnet18", 3, use_pretrained=False)  # torchvision's, not timm's
    assert type(resnet.backbone[0]).__module__.startswith("torch.nn")


def test_a_timm_name_without_timm_stops_with_the_pip_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(models.ArchError, match="pip install timm"):
        models.build_model("timm:test_vit", 3, use_pretrained=False, image_size=32)
    with pytest.raises(SystemExit):
        config.parse_config(["--arch", "timm:test_vit", "--exp_name", "x"])
    assert "needs timm, which is not installed here: pip install timm" in capsys.readouterr().err
    assert "not installed" in config.describe_archs()


def test_a_size_the_model_cannot_take_is_refused_before_training(capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse_config(["--arch", "timm:test_vit", "--image_size", "40", "--exp_name", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot give a feature map from 40 x 40 images" in err and "patch size" in err


def test_a_vit_gives_its_patch_tokens_on_their_grid_without_the_class_token():
    torch.manual_seed(0)
    model = models.build_model("timm:test_vit", 4, use_pretrained=False, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    fmap = model.backbone(x)
    assert fmap.shape == (2, 64, 4, 4)  # 64 px / patch 16: a 4 x 4 grid
    vit = model.backbone.model
    tokens = vit(x * model.backbone.scale + model.backbone.shift)  # class token first, then rows of patches
    assert vit.num_prefix_tokens == 1 and tokens.shape[1] == 17
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])
    # BoostLU's CAM form with alpha 1 is the pooled linear head: one set of weights serves both
    boost = models.MultiLabelClassifier(model.backbone, 64, 4, "avg", boostlu_alpha=1.0)
    boost.head = model.head
    torch.testing.assert_close(boost(x), model(x))


def test_a_model_pretrained_with_other_statistics_gets_its_own_normalisation():
    """Pixels come ImageNet-normalised (loaders.to_model_input); test_vit's config says mean = std = 0.5."""
    assert models.input_normalisation("timm:test_vit") == ((0.5,) * 3, (0.5,) * 3)
    assert models.input_normalisation("resnet50") == (loaders.IMAGENET_MEAN, loaders.IMAGENET_STD)
    assert (models.IMAGENET_MEAN, models.IMAGENET_STD) == (loaders.IMAGENET_MEAN, loaders.IMAGENET_STD)
    backbone = models.build_model("timm:test_vit", 4, use_pretrained=False, image_size=32).backbone.eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = backbone.model((pixels.float() / 255 - 0.5) / 0.5)[:, 1:]
    got = backbone(loaders.to_model_input(pixels)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    convnext = models.build_model("timm:resnet10t", 4, use_pretrained=False, image_size=32).backbone
    assert not convnext.renormalise  # ImageNet's own: nothing to redo


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_path_loads_a_timm_file_and_refuses_another_models(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("test_convnext", pretrained=False)  # with its ImageNet classifier, as released
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = models.build_model("timm:test_convnext", 3, use_pretrained=True, pretrained_path=path, image_size=32)
    torch.testing.assert_close(model.backbone.model.stem[0].weight, source.stem[0].weight)
    with pytest.raises(models.PretrainedWeightsUnavailable, match="does not fit timm's resnet10t"):
        models.build_model("timm:resnet10t", 3, use_pretrained=True, pretrained_path=path, image_size=32)


def test_pretrained_path_loads_a_torchvision_file_and_refuses_another_models(tmp_path):
    import torchvision

    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = models.build_model("resnet18", 3, use_pretrained=True, pretrained_path=tmp_path / "r18.pth")
    torch.testing.assert_close(model.backbone[0].weight, source.conv1.weight)
    mismatch = "does not fit torchvision's resnet34: keys .*missing"
    with pytest.raises(models.PretrainedWeightsUnavailable, match=mismatch):
        models.build_model("resnet34", 3, use_pretrained=True, pretrained_path=tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(models.PretrainedWeightsUnavailable, match="cannot be read as a state dict"):
        models.build_model("resnet18", 3, use_pretrained=True, pretrained_path=tmp_path / "junk.pth")


def test_offline_timm_weights_say_what_to_place_where(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(models.PretrainedWeightsUnavailable) as exc:
        models.build_model("timm:test_vit.r160_in1k", 3, use_pretrained=True, image_size=32)
    message = str(exc.value)
    assert "couldn't connect" in message and "models--timm--test_vit.r160_in1k" in message
    assert "--pretrained_path FILE" in message and "https://huggingface.co/timm/test_vit.r160_in1k" in message


def test_sync_batchnorm_keeps_timms_batchnorm_activations():
    model = models.build_model("timm:test_efficientnet", 3, use_pretrained=False, image_size=32)
    assert any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    synced = models.convert_sync_batchnorm(model)
    names = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNormAct" in names and "BatchNormAct2d" not in names


def test_the_arch_shows_in_the_run_name_and_list_archs(capsys):
    cfg = config.parse_config(["--arch", "timm:test_vit", "--use_pretrained", "false"])
    assert "_timm-test_vit_s0_" in cfg.exp_name
    assert "_timm-" not in config.parse_config([]).exp_name  # the dataset's own backbone: names as before
    with pytest.raises(SystemExit) as exc:
        config.parse_config(["--list_archs"])
    assert exc.value.code == 0 and "timm.list_models" in capsys.readouterr().out


def test_report_never_mixes_backbones_in_one_cell(tmp_path):
    def write(name, arch, val, test):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        cfg = {"dataset": "pascal", "loss": "an", "mod_scheme": "LL-R", "delta_rel": 0.2, "seed": 0, "arch": arch,
               "train_set_variant": "observed", "boostlu_alpha": 0.0, "train_mode": "end_to_end"}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "final.json").write_text(json.dumps({"val_map": val, "test_map": test, "best_epoch": 1}))

    write("r50", "resnet50", 80, 89.0)
    write("vit", "timm:vit_base_patch16_224.augreg_in21k", 95, 92.0)  # a better val: must not win ResNet-50's cell
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| LL-R | 89.0 +- 0.0 (d 0.2) [n=1] [paper 89.2, -0.2] |" in table
    assert "| LL-R [timm:vit_base_patch16_224.augreg_in21k] | 92.0 +- 0.0 (d 0.2) [n=1] |" in table


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["timm:test_vit", "timm:test_convnext"])
def test_boostlu_cam_and_predict_run_on_a_vit_and_a_convnext(synthetic_root, tmp_path, arch):
    name = arch.split(":")[1]
    run_main("--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", name, "--arch", arch,
             "--boostlu_alpha", "5", "--num_epochs", "1", *TINY)  # fmt: skip
    cfg, log, final = read_run(tmp_path / name)
    assert cfg["arch"] == arch and cfg["boostlu_alpha"] == 5.0 and len(log) == 1 and 0 < final["test_map"] <= 100
    image = synthetic_root / "images" / "test" / "test_000000.png"
    assert cam.main([str(tmp_path / name), str(image), "--top", "2"]) == 0
    assert (tmp_path / name / "cam" / "test_000000_cam.png").exists()
    run = predict.load_run(tmp_path / name)  # reads the architecture from config.json
    assert isinstance(run.model.backbone, models.TimmBackbone) and run.cfg.arch == arch


@pytest.mark.slow
def test_a_timm_run_resumes_to_the_uninterrupted_result(synthetic_root, tmp_path):
    args = ["--data_root", str(synthetic_root), "--save_path", str(tmp_path), "--exp_name", "r", "--arch",
            "timm:test_convnext", "--num_epochs", "2", *TINY]  # fmt: skip
    run_main(*args)
    reference = read_run(tmp_path / "r")
    folder = tmp_path / "r"
    (folder / "final.json").unlink()
    shutil.move(folder / "checkpoint_prev.pt", folder / "checkpoint.pt")  # as if stopped after epoch 1
    proc = run_main(*args)
    assert "resuming after epoch 1" in proc.stdout
    resumed = read_run(folder)
    for record in [*reference[1], reference[2], *resumed[1], resumed[2]]:
        for key in [k for k in record if k.endswith("seconds") or k == "fast_step_warmup_s"]:
            del record[key]
    assert resumed[1:] == reference[1:]
