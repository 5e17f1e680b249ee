"""TrialParams: the only value that passes from a search space to training.

A search space's ``suggest(trial, recipe) -> TrialParams`` returns one
(search_spaces/*.py; ``recipe`` is the study model's default recipe,
`study.search_space.default_recipe`, which it may search around);
``models.build`` and ``training.train`` read it. It is a frozen dataclass so
that it can be logged, stored as Optuna user attributes, written into
checkpoints and replayed exactly (``TrialParams.from_dict(params.to_dict()) == params``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cifar_hpo.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant", "wsd")
AUG_OPS = ("translate", "flip", "rotate", "cutout")  # implemented in augment.py (augment.OPS is this tuple)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrialParams:
    """Everything one training run needs to know besides data and epochs.

    Units are given where they matter; defaults are a sane small-CNN recipe.
    """

    model: str = "baseline_cnn"
    # Peak learning rate of the optimizer, per step (not scaled by batch size).
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0  # decoupled for AdamW/SGD, L2 for Adam (torch semantics)
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD momentum (Nesterov) or Adam beta1
    schedule: str = "constant"
    warmup_frac: float = 0.0  # fraction of all steps spent warming up linearly
    label_smoothing: float = 0.0
    # Augmentation: one knob in [0, 1] scaling every op; ops can be switched off.
    aug_strength: float = 0.0
    aug_ops: tuple[str, ...] = AUG_OPS
    # With the flip op: mirror each image in every other epoch (a coin per image in the
    # first) instead of a fresh coin per epoch.
    alt_flip: bool = False
    # Pretrained models: load ImageNet weights, train only the last
    # `finetune_depth` stages of the backbone (0 = only the new head).
    pretrained: bool = False
    finetune_depth: int = 0
    dropout: float = 0.0
    # Architecture options specific to one model (width, cifar_stem, upsample, ...).
    arch: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"  # auto = bf16 autocast on CUDA and on CPUs with AMX, else fp32
    # Learning-rate multiplier of the BatchNorm shifts (fast_cnn's BN has no scale and
    # its logits are scaled down, so its shifts learn slowly at the weights' lr).
    norm_lr_scale: float = 1.0
    # Lookahead: every `training.optim.LOOKAHEAD_IMAGES` training images the weights are pulled
    # towards an average of themselves, more strongly as training ends; the run ends on
    # the average (airbench's schedule, arXiv 2404.00498).
    lookahead: bool = False
    compile: bool = False  # torch.compile the model (CUDA only)

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.aug_strength <= 1.0:
            problems.append(f"aug_strength must be in [0, 1], got {self.aug_strength}")
        bad_ops = [op for op in self.aug_ops if op not in AUG_OPS]
        if bad_ops:
            problems.append(f"aug_ops may hold {', '.join(AUG_OPS)}, got {bad_ops}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.warmup_frac < 1.0:
            problems.append(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.finetune_depth < 0:
            problems.append(f"finetune_depth must be >= 0, got {self.finetune_depth}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_lr_scale > 0:
            problems.append(f"norm_lr_scale must be > 0, got {self.norm_lr_scale}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if problems:
            raise UserError("bad trial parameters: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["aug_ops"] = list(self.aug_ops)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialParams:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown trial parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        d = dict(d)
        if "aug_ops" in d:
            d["aug_ops"] = tuple(d["aug_ops"])
        if "arch" in d:
            d["arch"] = dict(d["arch"])
        return cls(**d)

    def replace(self, **changes: Any) -> TrialParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from ``--set`` into typed values.

    Values are read as TOML-ish literals: ints, floats, true/false, and
    comma-separated lists for tuples; ``arch.width=64`` sets a key of ``arch``.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected key=value, for example --set lr=0.01")
        key, raw = pair.split("=", 1)
        value = _literal(raw.strip())
        key = key.strip()
        if key.startswith("arch."):
            out.setdefault("arch", {})[key[5:]] = value
        elif key == "aug_ops":
            out[key] = tuple(v for v in raw.split(",") if v) if raw else ()
        else:
            out[key] = value
    return out


def _literal(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
