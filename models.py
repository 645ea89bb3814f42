"""Multi-label classifiers: a backbone's feature map, global pooling, and one linear head (logits, no sigmoid)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def _torchvision_models():
    """``torchvision.models``, imported on first use: importing torchvision takes about a second (it loads
    torch._dynamo), which the synthetic runs, ``--help`` and the tools that never build a ResNet need not pay."""
    import torchvision.models

    return torchvision.models


ARCHS = RESNETS + ("smallcnn",)


class SmallCNN(nn.Module):
    """Six conv+BN+ReLU layers (107k parameters) for the 32x32 synthetic images; returns a 4x4 feature map."""

    out_channels = 64
    _spec = (16, "pool", 32, 32, "pool", 64, 64, "pool", 64)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in self._spec:
            if item == "pool":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            channels = item
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiLabelClassifier(nn.Module):
    """``head(pool(backbone(x)))``. ``backbone`` and ``head`` are separate so the head can get ``lr * lr_mult``.

    With ``boostlu_alpha > 0`` the head is applied in its CAM form (a 1x1 convolution on the feature map), positive
    CAM values are multiplied by alpha (BoostLU, Kim et al., CVPR 2023), and global average pooling gives the logits.
    Without BoostLU and with average pooling the CAM form equals pooling then the linear head, so one set of weights
    serves both.
    """

    def __init__(
        self, backbone: nn.Module, feat_dim: int, num_classes: int, pool: str = "avg", boostlu_alpha: float = 0.0
    ) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.backbone = backbone
        self.pool = pool
        self.boostlu_alpha = boostlu_alpha
        self.head = nn.Linear(feat_dim, num_classes, bias=True)

    def pool_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3)) if self.pool == "avg" else fmap.amax(dim=(2, 3))

    def class_activation_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """B x C x h x w: the head applied at every position of the feature map."""
        return F.conv2d(fmap, self.head.weight[:, :, None, None], self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(x)
        # The head runs in fp32 even under bf16 autocast: logits rounded to bf16 would tie many scores (and losses).
        with torch.autocast(fmap.device.type, enabled=False):
            fmap = fmap.float()
            if self.boostlu_alpha > 0:
                cam = self.class_activation_map(fmap)
                return torch.where(cam > 0, cam * self.boostlu_alpha, cam).mean(dim=(2, 3))
            return self.head(self.pool_features(fmap))


class LabelEstimator(nn.Module):
    """ROLE's per-image label estimator (Cole et al., CVPR 2021): one learnable logit per training image and class.

    Initialised as in the authors' code: observed positives at sigmoid^-1(0.995), observed negatives at
    sigmoid^-1(0.005), unobserved entries uniform in +-sigmoid^-1(0.6).
    """

    def __init__(self, observed: torch.Tensor, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = math.log(0.6 / 0.4)
        logits = bound * (2 * torch.rand(observed.shape, generator=generator) - 1)
        logits[observed.cpu() == 1] = math.log(0.995 / 0.005)
        logits[observed.cpu() == -1] = math.log(0.005 / 0.995)
        self.logits = nn.Parameter(logits)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits[idx])


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested pretrained weights are neither cached nor downloadable."""


def _imagenet_state_dict(arch: str, weights_name: str) -> dict:
    try:
        weights = _torchvision_models().get_model_weights(arch)[weights_name]
    except KeyError:
        names = [w.name for w in _torchvision_models().get_model_weights(arch)]
        raise PretrainedWeightsUnavailable(f"{arch} has no weights {weights_name!r}; choose one of {names}.") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not here and not reachable"
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for {arch} ({weights_name}) are not cached and could not be downloaded ({err}).\n"
            f"Expected file: {cached}\n"
            f"Download {weights.url} on a machine with network and copy it there (or set TORCH_HOME), "
            f"or pass --use_pretrained false to train from scratch."
        ) from None


def build_model(
    arch: str,
    num_classes: int,
    *,
    use_pretrained: bool,
    weights_name: str = "IMAGENET1K_V1",
    smallcnn_weights: str | Path | None = None,
    boostlu_alpha: float = 0.0,
) -> MultiLabelClassifier:
    """The paper's classifier: torchvision ResNet without its fc, global average pooling, Linear(feat_dim, C).

    ``smallcnn`` is the synthetic dataset's backbone; its pretrained weights come from ``smallcnn_weights`` (the file
    written by ``synthetic.ensure_pretrained_backbone``). It pools with a global max, which suits small objects.
    """
    if arch == "smallcnn":
        backbone = SmallCNN()
        if use_pretrained:
            if smallcnn_weights is None or not Path(smallcnn_weights).exists():
                raise PretrainedWeightsUnavailable(
                    f"No pretrained smallcnn weights at {smallcnn_weights}; they exist only for --dataset synthetic. "
                    "Pass --use_pretrained false to train from scratch."
                )
            backbone.load_state_dict(torch.load(smallcnn_weights, map_location="cpu", weights_only=True))
        return MultiLabelClassifier(backbone, SmallCNN.out_channels, num_classes, "max", boostlu_alpha)
    if arch not in RESNETS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    resnet = getattr(_torchvision_models(), arch)(weights=None)
    if use_pretrained:
        resnet.load_state_dict(_imagenet_state_dict(arch, weights_name))
    feat_dim = resnet.fc.in_features
    backbone = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool and fc: the feature map
    return MultiLabelClassifier(backbone, feat_dim, num_classes, "avg", boostlu_alpha)
