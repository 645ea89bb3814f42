"""What channels-last changes in fp32 on this machine: the same model and batch, NCHW against channels-last.

    python bench/channels_last_cpu.py    # smallcnn (32 px), ResNet-18 and ResNet-50 (64 px), batch 8, random weights

``main.py`` lays out the model and its input channels-last on every device and precision (``train.py``,
``loaders.to_model_input``); the official code runs NCHW. Same arithmetic in exact terms, but the convolutions sum in
another order, so fp32 results can differ in the last bits. Prints one JSON object per model: the share of logits that
differ at all, the largest absolute and relative difference, and whether the top-1 class of any image changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402


@torch.inference_mode()
def compare(arch: str, size: int, batch: int = 8, num_classes: int = 80) -> dict:
    torch.manual_seed(0)
    model = models.build_model(arch, num_classes, use_pretrained=False).eval()
    x = torch.randn(batch, 3, size, size)
    nchw = model(x)
    model = model.to(memory_format=torch.channels_last)
    last = model(x.contiguous(memory_format=torch.channels_last))
    diff = (nchw - last).abs()
    return {
        "arch": arch,
        "image_size": size,
        "logits": nchw.numel(),
        "share_differing": round(float((diff > 0).float().mean()), 3),
        "max_abs": float(diff.max()),
        "max_rel": float((diff / nchw.abs().clamp_min(1e-12)).max()),
        "top1_changed": bool((nchw.argmax(1) != last.argmax(1)).any()),
    }


def main() -> None:
    torch.set_num_threads(1)  # one thread: the sum order of one core, repeatable
    for arch, size in (("smallcnn", 32), ("resnet18", 64), ("resnet50", 64)):
        print(json.dumps({"torch": torch.__version__, **compare(arch, size)}))


if __name__ == "__main__":
    main()
