"""ResNet18 fine-tuned from ImageNet weights (see search_spaces/pretrained.py)."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from search_spaces.pretrained import defaults_for, suggest_for


def defaults() -> TrialParams:
    """The original project's frozen-backbone ResNet18 recipe."""
    return defaults_for("resnet18")


def suggest(trial: optuna.trial.BaseTrial) -> TrialParams:
    """Search fine-tuning of ResNet18."""
    return suggest_for(trial, "resnet18")
