"""Model registry: one `Model` entry per name in ``MODELS``, and the default recipe of each.

    from cifar_hpo import models
    net = models.build(models.default_params("fast_cnn", "cpu"), num_classes=10)

Adding an architecture is one builder (a module of this package) and one `Model`
entry in ``MODELS``: its builder, the arch options it reads and the values each
takes, its fine-tune stages (if it has pretrained weights), what training asks of
it, and its default recipe per device kind (cpu, gpu).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from cifar_hpo.data.decode import IMAGE_SIZE
from cifar_hpo.errors import UserError
from cifar_hpo.models.fast import fast_cnn
from cifar_hpo.models.pretrained import _DENSENET121_STAGES, _RESNET18_STAGES, densenet121, resnet18
from cifar_hpo.models.simple import baseline_cnn, mlp
from cifar_hpo.params import TrialParams, parse_overrides

if TYPE_CHECKING:
    pass


DEVICE_KINDS = ("cpu", "gpu")  # the recipe kinds; a study file picks one (`recipe = "cpu"`)


ArchRule = Callable[[Any], str | None]  # an arch value -> what is wrong with it ("must be ..., got ..."), or None


def _shown(value: Any) -> str:
    """A value as the study file spells it (true/false, 'gelu', 0.5)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _is_int(value: Any) -> bool:
    """An int that is not a bool (bool is an int subclass: true is not a width)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(low: float, high: float, *, high_included: bool = True) -> ArchRule:
    """A finite int or float in (low, high], or in (low, high) when not ``high_included``."""
    bounds = f"({low:g}, {high:g}{']' if high_included else ')'}"

    def rule(value: Any) -> str | None:
        finite = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
        ok = finite and low < value and (value <= high if high_included else value < high)
        return None if ok else f"must be a finite number in {bounds}, got {_shown(value)}"

    return rule


def _integer(low: int, high: int, *, off: bool = False) -> ArchRule:
    """An int in [low, high]; with ``off``, 0 (the option switched off) as well."""
    what = f"{'0 (off) or ' if off else ''}an integer in [{low}, {high}]"

    def rule(value: Any) -> str | None:
        ok = _is_int(value) and (low <= value <= high or (off and value == 0))
        return None if ok else f"must be {what}, got {_shown(value)}"

    return rule


def _integers(count: int, low: int, high: int) -> ArchRule:
    """A list of ``count`` ints, each in [low, high]."""

    def rule(value: Any) -> str | None:
        ok = isinstance(value, list | tuple) and len(value) == count and all(_is_int(v) and low <= v <= high for v in value)
        return None if ok else f"must be a list of {count} integers in [{low}, {high}], got {_shown(value)}"

    return rule


def _one_of(*choices: Any, what: str = "") -> ArchRule:
    """One of ``choices``, of the same type (1 is not true, 1.0 is not 1); ``what`` says them in words."""
    what = what or f"one of {', '.join(_shown(c) for c in choices)}"

    def rule(value: Any) -> str | None:
        ok = any(type(value) is type(c) and value == c for c in choices)
        return None if ok else f"must be {what}, got {_shown(value)}"

    return rule


_FLAG = _one_of(False, True)


# fast_cnn (models.fast): `width` multiplies 64/256/256 channels (at least 8 each); `widths` sets them.
# The upper bounds stop a slip (width = 64 meant as channels) from building a network that never trains.
_FAST_CNN_ARCH: dict[str, ArchRule] = {
    "width": _number(0, 4), "widths": _integers(3, 1, 4096), "act": _one_of("gelu", "relu"),
    "tta": _one_of(0, 1, 2, False, True, what="0, 1 or 2 (or false/true)"),  # as FastCNN says it
    "logit_scale": _number(0, math.inf, high_included=False), "bn_momentum": _number(0, 1, high_included=False),
    "stem_stride": _one_of(1, 2), "identity_init": _FLAG,
}  # fmt: skip


# resnet18 / densenet121 (models.pretrained): `upsample` resizes each input to that size (0: off);
# below the input size it would shrink the images instead.
_PRETRAINED_ARCH: dict[str, ArchRule] = {
    "head_hidden": _integer(1, 16384), "cifar_stem": _FLAG, "upsample": _integer(IMAGE_SIZE, 512, off=True),
}  # fmt: skip


# mlp (models.simple): its first layer reads image_size**2 pixels, and every image is decoded to IMAGE_SIZE.
_MLP_ARCH: dict[str, ArchRule] = {"hidden": _integer(1, 16384), "depth": _integer(1, 32), "image_size": _one_of(IMAGE_SIZE)}


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
        arch_rules: the ``params.arch`` options the builder reads, each with the rule its
            value must follow (`ArchRule`), checked when a study file loads, on
            ``train --set arch.KEY=...`` and in `build`; any other option is refused (a
            typo would otherwise be ignored silently), see `arch_keys`.
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
    arch_rules: Mapping[str, ArchRule]
    recipes: dict[str, TrialParams]
    stages: tuple[tuple[str, ...], ...] = ()
    capabilities: Capabilities = Capabilities()

    @property
    def arch_keys(self) -> frozenset[str]:
        """The ``params.arch`` options the builder reads."""
        return frozenset(self.arch_rules)

    def arch_problem(self, arch: Mapping[str, Any]) -> tuple[str, str] | None:
        """The first option of ``arch`` whose value breaks its rule and what is wrong with it, or None.

        Options the model does not read are left to the caller, which names them in its own terms.
        """
        for key, value in arch.items():
            rule = self.arch_rules.get(key)
            problem = rule(value) if rule is not None else None
            if problem is not None:
                return key, problem
        return None


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
        arch_rules={},
        recipes=_same_on_both(TrialParams(
            model="baseline_cnn", optimizer="adam", lr=3e-3, batch_size=128, schedule="constant",
            aug_strength=1.0, aug_ops=("flip", "rotate"),
        )),  # fmt: skip
    ),
    # Adam lr 1e-3 with cosine decay, dropout 0.1, flips.
    "mlp": Model(
        build=mlp,
        arch_rules=_MLP_ARCH,
        recipes=_same_on_both(TrialParams(
            model="mlp", lr=1e-3, batch_size=256, optimizer="adam", schedule="cosine", warmup_frac=0.05, dropout=0.1,
            aug_strength=1.0, aug_ops=("flip",), arch={"hidden": 1024, "depth": 2},
        )),  # fmt: skip
    ),
    "resnet18": Model(
        build=resnet18,
        arch_rules=_PRETRAINED_ARCH,
        recipes=_same_on_both(_from_scratch_recipe("resnet18")),
        stages=_RESNET18_STAGES,
    ),
    "densenet121": Model(
        build=densenet121,
        arch_rules=_PRETRAINED_ARCH,
        recipes=_same_on_both(_from_scratch_recipe("densenet121")),
        stages=_DENSENET121_STAGES,
    ),
    # The airbench94 network and recipe; the same on a GPU at airbench's batch 1024.
    "fast_cnn": Model(
        build=fast_cnn,
        arch_rules=_FAST_CNN_ARCH,
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
            option the model does not read or a value it refuses (`Model.arch_rules`),
            or pretrained weights that are neither cached nor downloadable.
    """
    entry = get(params.model)
    unknown = sorted(set(params.arch) - entry.arch_keys)
    if unknown:
        valid = ", ".join(sorted(entry.arch_keys)) or "none"
        raise UserError(f"{params.model}: unknown arch option(s) {', '.join(unknown)}; valid: {valid}")
    bad = entry.arch_problem(params.arch)
    if bad is not None:
        raise UserError(f"{params.model}: arch.{bad[0]} {bad[1]}")
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

    Raises:
        UserError: an unknown field, a value of the wrong type, or an arch value the model refuses.
    """
    base = default_params(model_name, device)
    return apply_changes(base, checked_changes(base, overrides))


def checked_changes(base: TrialParams, overrides: list[str]) -> dict[str, Any]:
    """``--set key=value`` strings as typed changes of ``base`` (``arch``: only the keys set), checked.

    Raises:
        UserError: an unknown field, a value of the wrong type, or an arch value ``base.model`` refuses.
    """
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
                raise UserError(f"--set arch={value}: set one key of arch at a time, e.g. --set arch.width=0.5")
            raise UserError(f"--set {key}={value}: must be {type(current).__name__}, like the default {key}={current}")
    if "arch" in changes:
        bad = get(base.model).arch_problem(changes["arch"])
        if bad is not None:
            raise UserError(f"--set arch.{bad[0]}={changes['arch'][bad[0]]}: {bad[1]}")
    return changes


def apply_changes(params: TrialParams, changes: dict[str, Any]) -> TrialParams:
    """``params`` with `checked_changes` applied; ``arch`` keys are merged into its arch, not replacing it."""
    if not changes:
        return params
    if "arch" in changes:
        changes = {**changes, "arch": {**params.arch, **changes["arch"]}}
    if isinstance(changes.get("aug_ops"), list):  # read back from a study's recorded spec (JSON has no tuples)
        changes = {**changes, "aug_ops": tuple(changes["aug_ops"])}
    return params.replace(**changes)
