"""docs/protocol.md says --precision fp32 keeps the channels-last layout (so it is the official precision, not bit for
bit the official NCHW arithmetic), and that the layout changes fp32 results by rounding only."""

import torch

import loaders
import models
from config import parse_config
from train import autocast_for


def test_fp32_runs_channels_last_within_rounding_of_nchw():
    cfg = parse_config(["--precision", "fp32", "--exp_name", "x"])
    assert not torch.is_autocast_enabled("cpu")
    with autocast_for(cfg, torch.device("cpu"))():
        assert not torch.is_autocast_enabled("cpu")  # fp32: no autocast
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = loaders.to_model_input(images)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()  # the layout main.py feeds
    model = models.build_model("smallcnn", 10, use_pretrained=False).eval()
    with torch.inference_mode():
        nchw = model(x.contiguous())
        last = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(last, nchw, rtol=1e-5, atol=1e-6)
