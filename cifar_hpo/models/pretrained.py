"""ResNet-18 and DenseNet-121 from torchvision, fine-tuned from ImageNet weights (or trained from scratch).

Fine-tune stages (``params.finetune_depth`` = how many train, from the top;
the new head always trains; 5 or more = everything):
    resnet18      1 layer4, 2 layer3, 3 layer2, 4 layer1, 5 stem (conv1, bn1)
    densenet121   1 denseblock4 + norm5, 2 denseblock3 + transition3,
                  3 denseblock2 + transition2, 4 denseblock1 + transition1,
                  5 stem (conv0, norm0)
With ``arch.cifar_stem`` the stem is new (random init), so it always trains.

Pretrained weights (``params.pretrained``) come through torchvision's weights
API and the torch hub cache (``torch.hub.get_dir()/checkpoints``); where the file
is neither cached nor downloadable, `build` raises one `UserError` line naming
the path. Frozen BatchNorm layers stay in eval mode for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams


@dataclass(frozen=True)
class _Torchvision:
    """Where a torchvision classifier keeps the parts `_backbone` replaces (dotted attribute paths)."""

    builder: str  # function in torchvision.models
    weights: str  # its WeightsEnum class; IMAGENET1K_V1 is used
    stem_conv: str  # replaced by a 3x3 stride-1 conv with arch.cifar_stem
    stem_pool: str  # replaced by Identity with arch.cifar_stem
    head: str  # the classifier, replaced by `_head`


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dotted: str, value: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    setattr(_get(obj, parent) if parent else obj, last, value)


def _backbone(tv: _Torchvision, stages: tuple[tuple[str, ...], ...], params: TrialParams, num_classes: int) -> nn.Module:
    """A torchvision model with a new head; ``stages[-1]`` is its stem (see `Model.stages`)."""
    import torchvision.models as tvm

    builder, weights = getattr(tvm, tv.builder), getattr(tvm, tv.weights).IMAGENET1K_V1
    net = _pretrained(tv.builder, builder, weights) if params.pretrained else builder(weights=None)
    cifar_stem = bool(params.arch.get("cifar_stem", False))
    if cifar_stem:
        # 3x3 stride-1 first conv and no early max-pool keep 32x32 inputs at full
        # resolution into the first stage. The new conv (and its BN) always train.
        _set(net, tv.stem_conv, nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False))
        _set(net, tv.stem_pool, nn.Identity())
    _set(net, tv.head, _head(_get(net, tv.head).in_features, params, num_classes))
    frozen_bn: list[nn.Module] = []
    if params.pretrained:
        always = [tv.head] + (list(stages[-1]) if cifar_stem else [])  # the new head (+ new stem)
        frozen_bn = _freeze(net, stages, params.finetune_depth, always)
    return PretrainedNet(net, params.arch.get("upsample"), frozen_bn)


class PretrainedNet(nn.Module):
    """A torchvision backbone with a new head, optional upsampling and frozen stages.

    ``net`` is the torchvision model with its classifier replaced by the head.
    BatchNorm layers inside frozen stages stay in eval mode through every
    ``train()`` call, so their ImageNet running statistics never move.
    """

    def __init__(self, net: nn.Module, upsample: int | None, frozen_bn: Iterable[nn.Module] = ()) -> None:
        super().__init__()
        self.net = net
        self.upsample = int(upsample or 0)
        # A plain list, not a ModuleList: these modules are already registered under `net`.
        self._frozen_bn: list[nn.Module] = list(frozen_bn)
        for m in self._frozen_bn:
            m.eval()

    def train(self, mode: bool = True) -> PretrainedNet:
        super().train(mode)
        for m in self._frozen_bn:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample and x.shape[-1] != self.upsample:
            # On the device, per batch: cheaper than storing upsampled images.
            x = F.interpolate(x, size=(self.upsample, self.upsample), mode="bilinear", align_corners=False)
        return self.net(x)


def _head(features: int, params: TrialParams, num_classes: int) -> nn.Module:
    hidden = int(params.arch.get("head_hidden", 256))
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(params.dropout), nn.Linear(hidden, num_classes))


def weights_path(weights: Any) -> Path:
    """Where torch hub caches the file of a torchvision ``WeightsEnum`` member."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _pretrained(name: str, builder: Callable[..., nn.Module], weights: Any) -> nn.Module:
    """Build a torchvision model with ImageNet weights from the hub cache or the network.

    torchvision checks a file's hash only while downloading it, so a file placed
    in the cache by hand (machines without internet) is loaded as it is.
    """
    path = weights_path(weights)
    try:
        return builder(weights=weights, progress=False)
    except Exception as e:  # URLError, timeouts, HTTP errors, a truncated download
        cached = "is not in the cache" if not path.is_file() else "in the cache cannot be loaded"
        raise UserError(
            f"pretrained {name} weights {path.name} {cached} ({path}) and could not be downloaded "
            f"({type(e).__name__}); copy {path.name} there (or set TORCH_HOME), or train from scratch "
            "with --set pretrained=false"
        ) from None


def _freeze(model: nn.Module, stages: tuple[tuple[str, ...], ...], depth: int, always_train: Iterable[str]) -> list[nn.Module]:
    """Freeze every parameter except the top ``depth`` stages and ``always_train`` (the head).

    Returns:
        the BatchNorm modules inside frozen parts (to keep in eval mode).
    """
    trainable = [p for stage in stages[:depth] for p in stage] + list(always_train)

    def trains(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in trainable)

    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
    return [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not trains(name)]


_RESNET18 = _Torchvision("resnet18", "ResNet18_Weights", "conv1", "maxpool", "fc")


_DENSENET121 = _Torchvision("densenet121", "DenseNet121_Weights", "features.conv0", "features.pool0", "classifier")


_RESNET18_STAGES = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))


_DENSENET121_STAGES = (
    ("features.denseblock4", "features.norm5"),
    ("features.denseblock3", "features.transition3"),
    ("features.denseblock2", "features.transition2"),
    ("features.denseblock1", "features.transition1"),
    ("features.conv0", "features.norm0"),
)


def resnet18(params: TrialParams, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a new head; fine-tune stages in ``MODELS["resnet18"].stages``."""
    return _backbone(_RESNET18, _RESNET18_STAGES, params, num_classes)


def densenet121(params: TrialParams, num_classes: int) -> nn.Module:
    """torchvision DenseNet-121 with a new head; fine-tune stages in ``MODELS["densenet121"].stages``."""
    return _backbone(_DENSENET121, _DENSENET121_STAGES, params, num_classes)
