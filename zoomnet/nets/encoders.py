"""Encoders users already have: torchvision or timm architectures by name, their weights
from a local file, and the input they expect.

``model.feature: "torchvision/resnet18"`` builds torchvision's ResNet-18 with random
weights (``timm/<name>`` the same through timm), drops its classification head and
declares what it was trained on: its input size and its normalisation (ImageNet's, on the
0-255 scale). ``model.feature_weights`` then loads a local file into it; nothing is ever
downloaded. A net of a user's module (``package.module:callable``) declares the same with
attributes (``input_size``, ``pixel_mean``, ``pixel_std``); ``load_weights`` loads into any.

torchvision is the optional extra (``pip install "zoomnet[torchvision]"``): timm needs it too,
and more besides. Each torchvision release is built against one torch release: a torchvision
from PyPI that does not match the installed torch fails to import (``operator
torchvision::nms does not exist``), so install the pair that matches.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HUBS = ("torchvision", "timm")
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0-255 scale: (0.485, 0.456, 0.406) x 255
IMAGENET_STD = (58.395, 57.12, 57.375)
HEAD_NAMES = ("fc", "classifier", "head", "heads")  # where torchvision and timm keep a classifier


class HubNet(nn.Module):
    """A torchvision or timm net without its classification head: ``(M, 3, h, w)`` ->
    L2-normalised ``(M, D)`` features, as zoomnet's own feature nets give.

    Attributes:
        backbone: the net (its ``state_dict`` keys are those of the hub's net).
        out_dim: the feature size.
        input_size: ``(h, w)`` the net was trained on; sub-tiles are resampled to it.
        pixel_mean, pixel_std: its input statistics on the 0-255 scale.
        head_keys: key prefixes of the dropped head, ignored in a weight file.
    """

    def __init__(self, backbone: nn.Module, out_dim: int, input_size: tuple[int, int],
                 mean: tuple[float, ...], std: tuple[float, ...], head_keys: tuple[str, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.out_dim = int(out_dim)
        self.input_size = tuple(int(v) for v in input_size)
        self.pixel_mean, self.pixel_std = tuple(mean), tuple(std)
        self.head_keys = head_keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x).flatten(1), dim=1)


def hub_of(name: str) -> str | None:
    """``torchvision`` or ``timm`` for a name ``hub/architecture``, else None."""
    if not isinstance(name, str):
        return None
    hub, slash, arch = name.partition("/")
    return hub if slash and arch and hub in HUBS else None


def build_hub_net(name: str, in_channels: int = 3, **kwargs) -> HubNet:
    """The architecture ``hub/arch`` with random weights and no head (``ValueError``: the
    hub is not installed, or has no such architecture)."""
    hub, _, arch = name.partition("/")
    try:
        module = __import__(hub)
        if hub == "torchvision":
            import torchvision.models  # noqa: F401  (the subpackage, imported with the package)
    except Exception as exc:  # an ImportError, or a build that does not match the installed torch
        raise ValueError(
            f"{hub} does not import ({str(exc).splitlines()[0][:100]}); install the {hub} release built for "
            f"torch {torch.__version__.split('+')[0]} (pip install \"zoomnet[torchvision]\")"
        ) from None
    return _torchvision(module, arch, in_channels, kwargs) if hub == "torchvision" else _timm(module, arch, in_channels, kwargs)


def _torchvision(tv, arch: str, in_channels: int, kwargs: dict) -> HubNet:
    if in_channels != 3:
        raise ValueError(f"torchvision/{arch} takes 3 channels, the images have {in_channels}")
    if arch not in tv.models.list_models():
        raise ValueError(f"torchvision has no architecture {arch!r}; see torchvision.models.list_models()")
    net = tv.models.get_model(arch, weights=None, **kwargs)
    size, mean, std = (224, 224), IMAGENET_MEAN, IMAGENET_STD
    try:  # the statistics of its published weights (metadata only: nothing is downloaded)
        preset = tv.models.get_model_weights(arch).DEFAULT.transforms()
        size = tuple(preset.crop_size) * (2 // len(preset.crop_size))
        mean, std = tuple(255 * v for v in preset.mean), tuple(255 * v for v in preset.std)
    except Exception:  # an architecture without published weights: ImageNet's, at 224
        pass
    head, out_dim = drop_head(net)
    return HubNet(net, out_dim, size, mean, std, (head + ".",))


def _timm(timm, arch: str, in_channels: int, kwargs: dict) -> HubNet:
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"timm: {exc}; see timm.list_models()") from None
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    mean = tuple(255 * v for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(255 * v for v in cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != in_channels:
        mean, std = (sum(mean) / len(mean),) * in_channels, (sum(std) / len(std),) * in_channels
    head = cfg.get("classifier", "head")
    return HubNet(net, net.num_features, size, mean, std, (str(head) + ".",))


def drop_head(net: nn.Module) -> tuple[str, int]:
    """Replace the net's last linear layer (its classifier, under one of ``HEAD_NAMES``) by
    the identity; returns the head's name and the feature size before it."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[0] in HEAD_NAMES:
            last = name, module
    if last is None:
        raise ValueError(f"{type(net).__name__} has no linear head under {', '.join(HEAD_NAMES)} to remove")
    name, linear = last
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return name.split(".")[0], linear.in_features


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a weights-only ``torch.save`` file (no
    code runs). A checkpoint that nests its weights (``state_dict``, ``model``) is
    unwrapped and a ``module.`` prefix (a DistributedDataParallel save) removed.

    Raises:
        ValueError: the file is missing, damaged, or holds more than tensors.
    """
    path = Path(path)
    where = f"model.feature_weights={str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file; give the path of a local .safetensors or .pt file "
                         "(weights are never downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' and torch's errors for damaged or code-carrying files
        raise ValueError(f"{where}: not a safetensors file or a weights-only checkpoint ({str(exc).splitlines()[0][:120]}); "
                         "save the net's state_dict() with safetensors.torch.save_file or torch.save") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: holds no mapping of names to tensors; save the net's state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(feature: nn.Module, path: str | Path) -> str:
    """Load a weight file into a feature net (a :class:`HubNet`'s backbone, or the net);
    returns a one-line account. Keys of a dropped head are ignored.

    Raises:
        ValueError: one line naming the missing, unexpected or misshapen keys.
    """
    state = read_weights(path)
    target = getattr(feature, "backbone", feature)
    head = tuple(getattr(feature, "head_keys", ()))
    ignored = [k for k in state if head and k.startswith(head)]
    state = {k: v for k, v in state.items() if k not in ignored}
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    where = f"model.feature_weights={str(path)!r}"
    if missing or unexpected:
        parts = [f"{len(v)} {what} ({_names(v)})" for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise ValueError(f"{where}: keys {' and '.join(parts)}; the file does not match model.feature")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{where}: {len(wrong)} tensors of another shape, e.g. {k} {list(state[k].shape)} in the file, "
                         f"{list(own[k].shape)} in the net; the file does not match model.feature or its feature_kwargs")
    target.load_state_dict(state)
    dropped = f", head {', '.join(head)} dropped" if ignored else ""
    return f"feature weights: {len(state)} tensors from {path}{dropped}"


def _names(keys: list[str], shown: int = 3) -> str:
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def encoder_input(config, feature: nn.Module) -> tuple[tuple[int, int] | None, tuple[float, ...], tuple[float, ...]]:
    """What a model's feature net is fed: its input size (None: sub-tiles as read) and its
    statistics (0-255 scale): the configuration's where it sets them, else what the net
    declares (``input_size``, ``pixel_mean``, ``pixel_std``), else the model's pixel
    statistics and no resampling."""
    size = config.feature_size
    if size is None and getattr(feature, "input_size", None) is not None:
        declared = feature.input_size
        size = (int(declared), int(declared)) if isinstance(declared, int) else tuple(int(v) for v in declared)
    if config.feature_mean is not None:
        return size, tuple(config.feature_mean), tuple(config.feature_std)
    mean, std = getattr(feature, "pixel_mean", None), getattr(feature, "pixel_std", None)
    if mean is not None and std is not None and len(mean) == len(config.pixel_mean):
        return size, tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return size, tuple(config.pixel_mean), tuple(config.pixel_std)


def record_encoder_input(config, feature: nn.Module) -> None:
    """Write what the feature net is fed into the model configuration (the run records it,
    so that prediction feeds the same whatever the net declares then)."""
    size, mean, std = encoder_input(config, feature)
    config.feature_size = size
    config.feature_mean, config.feature_std = mean, std
