"""Multi-label classifiers: a backbone's feature map, global pooling, and one linear head (logits, no sigmoid).

Backbones: torchvision's ResNets (the paper's ResNet-50), the synthetic dataset's SmallCNN, and any timm model as
``timm:NAME`` (timm is optional: imported only for such a name). Every backbone gives a B x C x h x w feature map, so
every method (BoostLU's CAM-form head included) and every tool sees one kind of model.
"""

from __future__ import annotations

import functools
import importlib.util
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
TIMM_PREFIX = "timm:"  # --arch timm:NAME: any model timm.create_model knows (``timm.list_models``)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights'; ``loaders.to_model_input`` normalises with it
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_INSTALL = "pip install timm (or pip install -r requirements-test.txt)"


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


class ArchError(ValueError):
    """An architecture that cannot be used as asked: timm missing, an unknown name, or an image size the model cannot
    take; the message says what to do."""


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def arch_problem(arch: str) -> str | None:
    """What is wrong with an ``--arch`` value, judged without importing timm (None: nothing, as far as can be told so
    cheaply; ``check_arch`` looks the timm name up)."""
    if arch in ARCHS:
        return None
    if is_timm(arch):
        name = arch[len(TIMM_PREFIX) :]
        if not name or any(c.isspace() for c in name):
            return f"--arch {arch!r}: give a timm model name after 'timm:', e.g. timm:convnext_base.fb_in22k_ft_in1k"
        return None
    hint = f"; or {TIMM_PREFIX}{arch} for timm's model of that name" if "." in arch or "_" in arch else ""
    return f"--arch must be one of {', '.join(ARCHS)} or timm:NAME (got {arch!r}){hint}"


def _timm():
    """``timm``, imported on first use (it is optional, and importing it takes seconds)."""
    if importlib.util.find_spec("timm") is None:
        raise ArchError(f"--arch timm:NAME needs timm, which is not installed here: {TIMM_INSTALL}")
    import timm

    return timm


def _timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX) :]


def _create_timm(name: str, image_size: int | None, **kwargs) -> nn.Module:
    """``timm.create_model`` without classifier and without pooling (``global_pool=''``: the model's last feature map,
    after its final norm), built for ``image_size`` where the model takes a size (ViTs: position embeddings resized as
    timm resizes them); models that take no size (CNNs) take any."""
    timm = _timm()
    common = dict(num_classes=0, global_pool="", **kwargs)
    if image_size is None:
        return timm.create_model(name, **common)
    try:
        return timm.create_model(name, img_size=image_size, **common)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **common)


def _probe(name: str, image_size: int | None) -> tuple[nn.Module, torch.Tensor]:
    model = _create_timm(name, image_size, pretrained=False).eval()
    side = image_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, model(torch.zeros(1, 3, side, side))


@functools.cache
def timm_feature_shape(arch: str, image_size: int | None) -> tuple[str, int, int]:
    """(layout, channels, side) of the feature map ``--arch timm:NAME`` gives at ``image_size``, found by a forward on
    the meta device (no memory, no arithmetic). Layout: ``NCHW``, ``NHWC`` (e.g. Swin) or ``NLC`` (tokens: ViTs; the
    prefix tokens are dropped, the rest is a square grid). Raises ``ArchError`` saying what to do."""
    timm = _timm()
    name = _timm_name(arch)
    find = f"python -c \"import timm; print(timm.list_models('{name.split('.')[0].split('_')[0]}*', pretrained=True))\""
    if not timm.is_model(name):
        raise ArchError(f"--arch {arch}: timm {timm.__version__} has no model {name!r}. Names: {find}")
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError as err:
            raise ArchError(f"--arch {arch}: {err} Tagged names: {find}") from None
    size = f"{image_size} x {image_size}" if image_size else "its default size"
    try:
        try:
            with torch.device("meta"):
                model, out = _probe(name, image_size)
        except Exception:  # a model whose construction needs real values: once on the CPU, at real cost
            with torch.no_grad():
                model, out = _probe(name, image_size)
    except Exception as err:  # any model-specific refusal (a size the windows do not divide, a head it needs)
        raise ArchError(
            f"--arch {arch} cannot give a feature map from {size} images ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}). Choose another --image_size "
            "(a multiple of the model's patch or window size) or another model."
        ) from None
    layout = "NHWC" if "NHWC" in str(getattr(model, "output_fmt", "NCHW")) else "NCHW"
    if out.ndim == 3:
        layout = "NLC"
        tokens = out.shape[1] - getattr(model, "num_prefix_tokens", 0)
        grid = math.isqrt(max(tokens, 0))
        if grid * grid != tokens or grid == 0:
            raise ArchError(
                f"--arch {arch} gives {tokens} patch tokens at {size}, not a square grid: its CAM cannot "
                "be formed. Choose another --image_size or model."
            )
        return layout, out.shape[2], grid
    if out.ndim != 4:
        raise ArchError(f"--arch {arch} gives a {out.ndim}-dimensional output, not a feature map; choose another model")
    channels, side_out = (out.shape[3], out.shape[1]) if layout == "NHWC" else (out.shape[1], out.shape[2])
    return layout, channels, side_out


def check_arch(arch: str, image_size: int) -> None:
    """Refuse, before anything is trained or written, an architecture that cannot run at ``image_size``: timm not
    installed, an unknown timm name or tag, a size the model cannot take. Cheap for the built-in names."""
    problem = arch_problem(arch)
    if problem:
        raise ArchError(problem)
    if is_timm(arch):
        timm_feature_shape(arch, image_size)


def input_normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the backbone's pretrained weights expect: ImageNet's for the ResNets (torchvision's weights)
    and SmallCNN, the model's own pretrained config for timm (e.g. 0.5 / 0.5 for many ViTs)."""
    if not is_timm(arch):
        return IMAGENET_MEAN, IMAGENET_STD
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(_timm_name(arch))
    except RuntimeError:
        cfg = None
    if cfg is None:  # a model without pretrained weights: ImageNet's, as timm's own default
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


class TimmBackbone(nn.Module):
    """A timm model as a backbone: its last feature map as B x C x h x w, whatever its layout (a ViT's patch tokens
    reshaped to their grid, its class and register tokens dropped; a Swin's NHWC map permuted).

    Every pipeline of this project feeds ImageNet-normalised pixels (``loaders.to_model_input``); a model pretrained
    with other statistics re-normalises them here, ``x * (s_in / s) + (m_in - m) / s``, so training, evaluation,
    LinearInit's features, cam.py and predict.py all give it its own normalisation without knowing it.
    """

    def __init__(self, model: nn.Module, layout: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model, self.layout = model, layout
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.renormalise = (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD)
        m_in, s_in, m, s = (
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD, mean, std)
        )
        # Not in the state dict: they follow from the architecture, and checkpoints keep the model's own keys.
        self.register_buffer("scale", s_in / s, persistent=False)
        self.register_buffer("shift", (m_in - m) / s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = x * self.scale + self.shift
        out = self.model(x)
        if self.layout == "NHWC":
            return out.permute(0, 3, 1, 2)
        if self.layout == "NLC":
            patches = out[:, self.num_prefix_tokens :]
            side = math.isqrt(patches.shape[1])  # shapes are host values: no read from the device
            return patches.unflatten(1, (side, side)).permute(0, 3, 1, 2)
        return out


def _read_weights_file(path: str | Path) -> dict:
    """A state dict from a ``.safetensors`` file or a ``torch.save``d one (also under a "state_dict" or "model" key)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"--pretrained_path {path}: no such file")
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise PretrainedWeightsUnavailable(f"{path} is a safetensors file, which needs: pip install safetensors")
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one holding objects weights_only refuses: never run its code
        raise PretrainedWeightsUnavailable(
            f"--pretrained_path {path} cannot be read as a state dict ({type(err).__name__}); give a .safetensors "
            "file or a torch.save'd state dict"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsUnavailable(f"--pretrained_path {path} holds no state dict (names to tensors)")
    return state


def _load_checked(module: nn.Module, state: dict, path: str | Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``, refusing a file whose keys or shapes do not match the model's (``ignore``: key
    prefixes of a classifier the backbone drops)."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(v)} {name} (e.g. {', '.join(v[:3])})"
            for name, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
            if v
        ]
        raise PretrainedWeightsUnavailable(
            f"--pretrained_path {path} does not fit {what}: keys {'; '.join(parts)}. Give the weights of this "
            "architecture (its state dict, or timm's .safetensors file for a timm model)."
        )
    module.load_state_dict(state, strict=False)


def _timm_weights_message(name: str, err: Exception) -> str:
    try:
        hub_id = _timm().models.get_pretrained_cfg(name).hf_hub_id or f"timm/{name}"
    except Exception:  # no pretrained config at all: the model has no weights to download
        hub_id = f"timm/{name}"
    return (
        f"timm could not load pretrained weights for {name} ({type(err).__name__}: "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}).\n"
        f"Offline: on a machine with network run  python -c \"import timm; timm.create_model('{name}', "
        f'pretrained=True)"  and copy its Hugging Face cache folder (~/.cache/huggingface/hub/models--'
        f"{hub_id.replace('/', '--')}, or under $HF_HOME) to the same place here; or download "
        f"https://huggingface.co/{hub_id} (model.safetensors) and pass --pretrained_path FILE; or train from scratch "
        "with --use_pretrained false."
    )


def _check_timm_file(model: nn.Module, state: dict, path: str | Path, name: str) -> None:
    """timm loads a file's weights leniently (keys that do not match only warn): refuse, before it does, a file whose
    keys are not the model's, its classifier aside. Shapes are timm's to adapt (a ViT's position embeddings)."""
    classifier = model.pretrained_cfg.get("classifier") or ()
    ignore = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore)]
    if missing or unexpected:
        parts = [
            f"{len(v)} {what} (e.g. {', '.join(v[:3])})"
            for what, v in (("missing", missing), ("unexpected", unexpected))
            if v
        ]
        raise PretrainedWeightsUnavailable(
            f"--pretrained_path {path} does not fit timm's {name}: keys {'; '.join(parts)}. Give timm's weights of "
            f"this model (model.safetensors from https://huggingface.co/timm/{name})."
        )


def _build_timm(arch: str, image_size: int | None, use_pretrained: bool, pretrained_path: str | None) -> TimmBackbone:
    name = _timm_name(arch)
    layout, _, _ = timm_feature_shape(arch, image_size)
    if use_pretrained and pretrained_path is not None:
        model = _create_timm(name, image_size, pretrained=False)
        _check_timm_file(model, _read_weights_file(pretrained_path), pretrained_path, name)
        # timm's own loader: its filters (a ViT's position embeddings resized to the size, the classifier dropped).
        overlay = dict(file=str(pretrained_path), custom_load=False)
        try:
            model = _create_timm(name, image_size, pretrained=True, pretrained_cfg_overlay=overlay)
        except (RuntimeError, KeyError, ValueError) as err:
            raise PretrainedWeightsUnavailable(
                f"--pretrained_path {pretrained_path} does not fit timm's {name}: {str(err).strip()[:600]}"
            ) from None
    elif use_pretrained:
        try:
            model = _create_timm(name, image_size, pretrained=True)
        except Exception as err:  # hub and network errors of every kind: "not here and not reachable"
            raise PretrainedWeightsUnavailable(_timm_weights_message(name, err)) from None
    else:
        model = _create_timm(name, image_size, pretrained=False)
    return TimmBackbone(model, layout, *input_normalisation(arch))


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm for torchrun: timm's conversion where the model has timm's BatchNorm+activation layers (torch's
    would drop their activation), torch's otherwise."""
    if any(type(m).__module__.startswith("timm.") for m in module.modules()):
        return _timm().layers.convert_sync_batchnorm(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def build_model(
    arch: str,
    num_classes: int,
    *,
    use_pretrained: bool,
    weights_name: str = "IMAGENET1K_V1",
    smallcnn_weights: str | Path | None = None,
    boostlu_alpha: float = 0.0,
    image_size: int | None = None,
    pretrained_path: str | Path | None = None,
) -> MultiLabelClassifier:
    """The paper's classifier: torchvision ResNet without its fc, global average pooling, Linear(feat_dim, C).

    ``smallcnn`` is the synthetic dataset's backbone; its pretrained weights come from ``smallcnn_weights`` (the file
    written by ``synthetic.ensure_pretrained_backbone``). It pools with a global max, which suits small objects.
    ``timm:NAME`` is timm's model built for ``image_size`` (its feature map after its final norm, average pooled).
    ``pretrained_path``: the backbone's weights from a local file instead (ResNets and timm models).
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
    if is_timm(arch):
        problem = arch_problem(arch)
        if problem:
            raise ArchError(problem)
        timm_backbone = _build_timm(arch, image_size, use_pretrained, pretrained_path)
        _, channels, _ = timm_feature_shape(arch, image_size)
        return MultiLabelClassifier(timm_backbone, channels, num_classes, "avg", boostlu_alpha)
    if arch not in RESNETS:
        raise ArchError(arch_problem(arch) or f"unknown arch {arch!r}")
    resnet = getattr(_torchvision_models(), arch)(weights=None)
    if use_pretrained and pretrained_path is not None:
        _load_checked(resnet, _read_weights_file(pretrained_path), pretrained_path, f"torchvision's {arch}", ("fc.",))
    elif use_pretrained:
        resnet.load_state_dict(_imagenet_state_dict(arch, weights_name))
    feat_dim = resnet.fc.in_features
    backbone = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool and fc: the feature map
    return MultiLabelClassifier(backbone, feat_dim, num_classes, "avg", boostlu_alpha)
