"""Model registry: one `Model` entry per name in ``MODELS``, and the default recipe of each.

    from cifar_hpo import models
    net = models.build(models.default_params("fast_cnn", "cpu"), num_classes=10)

Adding an architecture is one builder (a module of this package) and one `Model`
entry in ``MODELS``: its builder, the arch options it reads, its fine-tune stages
(if it has pretrained weights), what training asks of it, and its default recipe
per device kind (cpu, gpu).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from cifar_hpo.errors import UserError
from cifar_hpo.models.fast import fast_cnn
from cifar_hpo.models.pretrained import _DENSENET121_STAGES, _PRETRAINED_KEYS, _RESNET18_STAGES, densenet121, resnet18
from cifar_hpo.models.simple import baseline_cnn, mlp
from cifar_hpo.params import TrialParams, parse_overrides

if TYPE_CHECKING:
    pass


DEVICE_KINDS = ("cpu", "gpu")  # the recipe kinds; a study file picks one (`recipe = "cpu"`)


class DataInit(Protocol):
    """A model declaring ``Capabilities.init_from_data``: its first layers are set from the data."""

    def init_from_data(self, x: torch.Tensor) -> None:
        """Initialise from ``x``: a few thousand normalized training images (N, 3, H, W)."""


@dataclass(frozen=True)
class Capabilities:
    """What training asks of a built model beyond ``forward``: declared here, never probed for.

    A module built for an entry must offer exactly what the entry declares (the
    registry-wide test in tests/test_models.py checks every entry); a wrapper around
    it must offer the same.

    Attributes:
        init_from_data: the module has ``init_from_data(x)`` (`DataInit`); `training.train`
            calls it once, before the first step of a fresh run (not on resume), with up to
            ``training.loop.DATA_INIT_IMAGES`` evenly spaced normalized training images.
        tta_levels: the levels the module's int ``tta`` attribute (test-time augmentation
            in eval mode) takes, 0 being one plain pass; empty: the module has no ``tta``.
            Training evaluates the epochs before a run's last at level 0, the last at the
            module's own level.
    """

    init_from_data: bool = False
    tta_levels: tuple[int, ...] = ()

    @property
    def tta(self) -> bool:
        """Whether the module has a ``tta`` attribute (`tta_levels` is not empty)."""
        return bool(self.tta_levels)


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
        capabilities: what training asks of the built module besides ``forward``
            (`Capabilities`: data-dependent initialisation, test-time augmentation
            levels); the default: nothing.
    """

    build: Callable[[TrialParams, int], nn.Module]
    arch_keys: frozenset[str]
    recipes: dict[str, TrialParams]
    stages: tuple[tuple[str, ...], ...] = ()
    capabilities: Capabilities = Capabilities()


def _same_on_both(params: TrialParams) -> dict[str, TrialParams]:
    return {kind: params for kind in DEVICE_KINDS}


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
# autocast where the CPU has AMX, fp32 elsewhere (precision "auto"; the measurements are in
# device.cpu_has_amx). Measured: README's time-to-accuracy table.
_FAST_CNN = TrialParams(
    model="fast_cnn", lr=0.375, batch_size=256, optimizer="sgd", momentum=0.85, weight_decay=1.33e-3,
    schedule="onecycle", warmup_frac=0.23, label_smoothing=0.2, aug_strength=0.5, aug_ops=("translate", "flip"),
    alt_flip=True, norm_lr_scale=64.0, lookahead=True, arch={"width": 1.0, "stem_stride": 1, "tta": 2, "bn_momentum": 0.4},
    precision="auto",  # bf16 autocast where it pays: CUDA, CPUs with AMX (training.precision.use_bf16)
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
        # FastCNN.init_from_data whitens 2x2 patches; FastCNN.tta: 0 none, 1 mirror, 2 mirror + translate.
        capabilities=Capabilities(init_from_data=True, tta_levels=(0, 1, 2)),
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


def params_for(model_name: str, overrides: list[str], device: torch.device | str | None = None) -> TrialParams:
    """`models.default_params` of ``model_name`` with ``--set key=value`` overrides.

    ``arch.*`` overrides are merged into the default arch dict, not replacing it.
    """
    base = default_params(model_name, device)
    changes = parse_overrides(overrides)
    changes.pop("model", None)
    names = [f.name for f in dataclasses.fields(base) if f.name != "model"]
    for key, value in changes.items():
        if key not in names:
            raise UserError(f"--set {key}=...: unknown TrialParams field; valid: {', '.join(names)} (and arch.KEY)")
        current = getattr(base, key)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            changes[key] = value = float(value)
        if not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool):
            if key == "arch":
                raise UserError(f"--set arch={value}: set one key of arch at a time, e.g. --set arch.width=64")
            raise UserError(f"--set {key}={value}: must be {type(current).__name__}, like the default {key}={current}")
    if "arch" in changes:
        changes["arch"] = {**base.arch, **changes["arch"]}
    return base.replace(**changes)
