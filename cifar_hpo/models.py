"""Model registry: one `Model` entry per name in ``MODELS``.

    from cifar_hpo import models
    net = models.build(models.default_params("fast_cnn", "cpu"), num_classes=10)

Every model takes normalized float images (B, 3, 32, 32) and returns logits
(B, num_classes); the loss is cross-entropy on logits, so no model ends in a
softmax. Adding an architecture is one builder and one `Model` entry in
``MODELS``: its builder, the arch options it reads, its fine-tune stages (if it
has pretrained weights) and its default recipe per device kind (cpu, gpu).

Models:
    baseline_cnn  the original project's LeNet-style CNN, layer for layer.
    mlp           a dense network; arch: ``hidden`` (width), ``depth`` (hidden layers).
    resnet18      torchvision ResNet-18; arch: ``cifar_stem``, ``upsample``, ``head_hidden``.
    densenet121   torchvision DenseNet-121; same arch options as resnet18.
    fast_cnn      our network built for time-to-accuracy; arch: ``width`` (multiplier of
                  64/256/256 channels) or ``widths``, ``stem_stride`` (1 or 2), ``act``
                  (gelu|relu), ``tta`` (0 none, 1 mirror, 2 mirror + translate), ``logit_scale``,
                  ``bn_momentum``, ``identity_init``.

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

__all__ = [
    "MODELS", "Model", "DEVICE_KINDS", "get", "build", "default_params", "device_kind", "count_params", "weights_path",
    "FastCNN", "PretrainedNet",
]  # fmt: skip


# ---------------------------------------------------------------- baseline_cnn and mlp


def baseline_cnn(params: TrialParams, num_classes: int) -> nn.Module:
    """The original project's handcrafted CNN, exactly (logits out, no softmax)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def mlp(params: TrialParams, num_classes: int) -> nn.Module:
    """A dense network on flattened pixels.

    arch: ``hidden`` units per layer (default 512), ``depth`` hidden layers
    (default 2), ``image_size`` (default 32). Dropout ``params.dropout`` after
    each hidden layer.
    """
    hidden = int(params.arch.get("hidden", 512))
    depth = int(params.arch.get("depth", 2))
    size = int(params.arch.get("image_size", 32))
    layers: list[nn.Module] = [nn.Flatten()]
    width = 3 * size * size
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(params.dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- fast_cnn


class _ConvGroup(nn.Sequential):
    """conv3x3 -> max-pool 2 -> BN -> act -> conv3x3 -> BN -> act (halves H and W)."""

    def __init__(
        self, c_in: int, c_out: int, act: Callable[[], nn.Module], bn_momentum: float, identity_init: bool
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            _bn(c_out, bn_momentum),
            act(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _bn(c_out, bn_momentum),
            act(),
        )
        if identity_init:
            # The first c_in filters of each conv start as the identity (pass their input
            # channel through), the rest keep torch's default init (airbench's init).
            with torch.no_grad():
                for conv in (self[0], self[4]):
                    assert isinstance(conv, nn.Conv2d)
                    w = conv.weight
                    nn.init.dirac_(w[: min(w.shape[0], w.shape[1])])


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    # Scale fixed at 1 (only the shift learns): with the scaled logits below this
    # trains faster at high learning rates and removes a redundant degree of freedom.
    bn = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-5)
    bn.weight.requires_grad_(False)
    return bn


class FastCNN(nn.Module):
    """Small VGG-like network tuned for speed to accuracy on CIFAR-10.

    Ideas from the published fast CIFAR-10 recipes (arXiv 2404.00498):
    a frozen 2x2 patch-whitening first layer initialised from the data
    (`init_from_data`, called by `train.train` before the first step), three
    conv groups with max-pooling, BatchNorm without a learnt scale, a global
    max-pool, a bias-free linear layer whose logits are scaled down, and
    test-time augmentation in eval mode (mirror, and 1-pixel translations). Training-side tricks
    (label smoothing, Nesterov SGD, one-cycle lr) live in the recipe
    (``MODELS["fast_cnn"].recipes``).

    Args:
        num_classes: output logits.
        widths: channels of the three conv groups (full size: 64, 256, 256).
        act: "gelu" or "relu".
        tta: test-time augmentation in eval mode: 0 none; 1 average the logits of the
            image and its mirror image; 2 also of both shifted one pixel up-left and
            down-right (reflected border), weighted half and half (6 passes, airbench's level 2).
        logit_scale: multiplies the logits (1/9 keeps early softmax outputs soft).
        bn_momentum: BatchNorm running-statistics momentum (torch convention).
        stem_stride: 1 (2x2 patches overlap, 31x31 out) or 2 (non-overlapping, 16x16 out).
        identity_init: start each conv's first filters as the identity (`_ConvGroup`).
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int] = (64, 256, 256),
        act: str = "gelu",
        tta: int = 1,
        logit_scale: float = 1 / 9,
        bn_momentum: float = 0.2,
        stem_stride: int = 1,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        acts: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": lambda: nn.ReLU(inplace=True)}
        if act not in acts:
            raise UserError(f"fast_cnn arch.act must be one of {', '.join(acts)}, got {act!r}")
        # 2x2 patches of 3 channels = 12 dimensions; the whitening filters and their
        # negatives (24 channels) keep both signs alive through the nonlinearity.
        # stem_stride 2 whitens non-overlapping patches (a "patchify" stem): every later
        # layer then runs at a quarter of the pixels, ~4x cheaper, for some accuracy.
        self.whiten = nn.Conv2d(3, 24, 2, stride=stem_stride, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act0 = acts[act]()
        groups, c_in = [], 24
        for c_out in widths:
            groups.append(_ConvGroup(c_in, c_out, acts[act], bn_momentum, identity_init))
            c_in = c_out
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.logit_scale = logit_scale
        if not isinstance(tta, int) or int(tta) not in (0, 1, 2):  # bool is an int: false 0, true 1
            raise UserError(f"fast_cnn arch.tta must be 0, 1 or 2 (or false/true), got {tta!r}")
        self.tta = int(tta)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act0(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale

    def _mirror(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self._logits(x) + self._logits(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.tta == 0:
            return self._logits(x)
        if self.tta == 1:
            return self._mirror(x)
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = 0.5 * (self._mirror(padded[..., :h, :w]) + self._mirror(padded[..., 2:, 2:]))
        return 0.5 * (self._mirror(x) + shifted)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten 2x2 patches of ``x`` (normalized images).

        Args:
            x: a few thousand normalized training images (N, 3, H, W).
            eps: added to the patch-covariance eigenvalues (normalized units squared)
                so that near-zero directions are not amplified without bound.
        """
        k = self.whiten.kernel_size[0]
        patches = F.unfold(x.float(), k).transpose(1, 2).reshape(-1, 3 * k * k).double()
        mean = patches.mean(0)
        centred = patches - mean
        cov = centred.T @ centred / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        filters = eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None]  # (12, 12): rows are filters
        w = torch.cat([filters, -filters])
        self.whiten.weight.copy_(w.reshape(-1, 3, k, k).to(self.whiten.weight))
        # Outputs centred on the data: bias = -W @ mean patch.
        assert self.whiten.bias is not None
        self.whiten.bias.copy_((-(w @ mean)).to(self.whiten.bias))


def fast_cnn(params: TrialParams, num_classes: int) -> nn.Module:
    """`FastCNN` from ``params.arch``: ``width`` multiplier (1.0 = 64/256/256) or ``widths``."""
    arch = params.arch
    if "widths" in arch:
        widths = tuple(int(w) for w in arch["widths"])
        if len(widths) != 3:
            raise UserError(f"fast_cnn arch.widths needs 3 values, got {arch['widths']!r}")
    else:
        m = float(arch.get("width", 1.0))
        widths = tuple(max(8, round(c * m)) for c in (64, 256, 256))
    return FastCNN(
        num_classes,
        widths=widths,  # type: ignore[arg-type]
        act=str(arch.get("act", "gelu")),
        tta=arch.get("tta", 1),
        logit_scale=float(arch.get("logit_scale", 1 / 9)),
        bn_momentum=float(arch.get("bn_momentum", 0.2)),
        stem_stride=int(arch.get("stem_stride", 1)),
        identity_init=bool(arch.get("identity_init", True)),
    )


# ---------------------------------------------------------------- torchvision backbones


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


# ---------------------------------------------------------------- registry

DEVICE_KINDS = ("cpu", "gpu")  # the recipe kinds; a study file picks one (`recipe = "cpu"`)


@dataclass(frozen=True)
class Model:
    """Everything the project knows about one model: the one place to add one.

    Attributes:
        build: ``build(params, num_classes) -> nn.Module``.
        arch_keys: the ``params.arch`` options the builder reads; any other is refused
            (a typo would otherwise be ignored silently).
        stages: backbone stages from the top (output side) down, for
            ``params.finetune_depth``: depth d trains the first d entries (plus the new
            head), 0 only the head, ``len(stages)`` everything; the last entry is the
            stem. Empty: the model has no pretrained weights, fine-tune depth is unused.
        recipes: the default training recipe per device kind (`DEVICE_KINDS`), used by
            ``cifar-hpo train``, ``retrain --default-params``, the report's baseline and
            the search spaces that search around it.
    """

    build: Callable[[TrialParams, int], nn.Module]
    arch_keys: frozenset[str]
    recipes: dict[str, TrialParams]
    stages: tuple[tuple[str, ...], ...] = ()


def _same_on_both(params: TrialParams) -> dict[str, TrialParams]:
    return {kind: params for kind in DEVICE_KINDS}


_PRETRAINED_KEYS = frozenset({"head_hidden", "cifar_stem", "upsample"})
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


def _from_scratch_recipe(model: str) -> TrialParams:
    # resnet18 / densenet121 from scratch with the CIFAR stem: Nesterov SGD lr 0.1
    # (batch 256) one-cycle, weight decay 5e-4, label smoothing 0.1, translate + flip.
    # Set pretrained=true (and finetune_depth) where the ImageNet weights are cached.
    return TrialParams(
        model=model, lr=0.1, batch_size=256, optimizer="sgd", momentum=0.9, weight_decay=5e-4, schedule="onecycle",
        warmup_frac=0.15, label_smoothing=0.1, aug_strength=0.5, aug_ops=("translate", "flip"), dropout=0.2,
        arch={"cifar_stem": True, "upsample": 0, "head_hidden": 256},
    )  # fmt: skip


# fast_cnn: airbench94's training recipe (arXiv 2404.00498, github.com/KellerJordan/cifar10-airbench)
# in this project's units (mean loss, lr per step): its lr 11.5 and weight decay 0.0153
# "per 1024 examples" with momentum 0.85 are lr 1.5 and weight decay 1.33e-3 at batch 1024,
# lr 0.375 at batch 256 (same decay); BatchNorm shifts at 64x the lr; warmup over 23% of
# the steps then a linear decay; lookahead averaging; label smoothing 0.2; 2 px translation
# and flips; mirror + translate test-time augmentation. The CPU recipe is the same network
# at batch 256, the fastest per image on a 2-core CPU (batch 1024 ran 35% slower), in bf16
# autocast (AMX/AVX-512 bf16: ~1.7x fp32). Measured: README's time-to-accuracy table.
_FAST_CNN = TrialParams(
    model="fast_cnn", lr=0.375, batch_size=256, optimizer="sgd", momentum=0.85, weight_decay=1.33e-3,
    schedule="onecycle", warmup_frac=0.23, label_smoothing=0.2, aug_strength=0.5, aug_ops=("translate", "flip"),
    alt_flip=True, norm_lr_scale=64.0, lookahead=True, arch={"width": 1.0, "stem_stride": 1, "tta": 2, "bn_momentum": 0.4},
    precision="auto",  # bf16 autocast where it pays: CUDA, CPUs with AMX (train._use_bf16)
)  # fmt: skip

MODELS: dict[str, Model] = {
    # The original project's recipe: Adam lr 3e-3, batch 128, constant lr, flips and
    # rotations at full strength (the reference every report compares against).
    "baseline_cnn": Model(
        build=baseline_cnn,
        arch_keys=frozenset(),
        recipes=_same_on_both(TrialParams(
            model="baseline_cnn", optimizer="adam", lr=3e-3, batch_size=128, schedule="constant",
            aug_strength=1.0, aug_ops=("flip", "rotate"),
        )),  # fmt: skip
    ),
    # Adam lr 1e-3 with cosine decay, dropout 0.1, flips.
    "mlp": Model(
        build=mlp,
        arch_keys=frozenset({"hidden", "depth", "image_size"}),
        recipes=_same_on_both(TrialParams(
            model="mlp", lr=1e-3, batch_size=256, optimizer="adam", schedule="cosine", warmup_frac=0.05, dropout=0.1,
            aug_strength=1.0, aug_ops=("flip",), arch={"hidden": 1024, "depth": 2},
        )),  # fmt: skip
    ),
    "resnet18": Model(
        build=resnet18,
        arch_keys=_PRETRAINED_KEYS,
        recipes=_same_on_both(_from_scratch_recipe("resnet18")),
        stages=_RESNET18_STAGES,
    ),
    "densenet121": Model(
        build=densenet121,
        arch_keys=_PRETRAINED_KEYS,
        recipes=_same_on_both(_from_scratch_recipe("densenet121")),
        stages=_DENSENET121_STAGES,
    ),
    # The airbench94 network and recipe; the same on a GPU at airbench's batch 1024.
    "fast_cnn": Model(
        build=fast_cnn,
        arch_keys=frozenset({"widths", "width", "act", "tta", "logit_scale", "bn_momentum", "stem_stride", "identity_init"}),
        recipes={
            "cpu": _FAST_CNN,
            "gpu": _FAST_CNN.replace(lr=1.5, batch_size=1024, precision="auto"),
        },
    ),
}


def get(name: str) -> Model:
    """The registry entry of ``name``.

    Raises:
        UserError: unknown model; the message lists the valid ones.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def build(params: TrialParams, num_classes: int) -> nn.Module:
    """Build ``params.model`` for ``num_classes`` classes.

    Raises:
        UserError: unknown model name (the message lists the valid ones), an arch
            option the model does not read, or pretrained weights that are neither
            cached nor downloadable.
    """
    entry = get(params.model)
    unknown = sorted(set(params.arch) - entry.arch_keys)
    if unknown:
        valid = ", ".join(sorted(entry.arch_keys)) or "none"
        raise UserError(f"{params.model}: unknown arch option(s) {', '.join(unknown)}; valid: {valid}")
    return entry.build(params, num_classes)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def device_kind(device: str | torch.device | None) -> str:
    """``"gpu"`` for a CUDA device, ``"cpu"`` for anything else (or None); a kind passes through."""
    if device in DEVICE_KINDS:
        return str(device)
    return "gpu" if device is not None and torch.device(device).type == "cuda" else "cpu"


def default_params(model_name: str, device: str | torch.device | None = None) -> TrialParams:
    """The model's default recipe (`Model.recipes`) for a device kind.

    Args:
        model_name: a key of `MODELS`.
        device: ``"cpu"``/``"gpu"`` (a study's ``recipe``) or a torch device
            (``cifar-hpo train``: CUDA picks the gpu recipe); None means cpu.

    Raises:
        UserError: unknown model (the message lists the valid ones).
    """
    recipe = get(model_name).recipes[device_kind(device)]
    return recipe.replace(arch=dict(recipe.arch))  # a caller editing its arch dict must not edit the registry
