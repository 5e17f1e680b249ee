"""DenseNet121 fine-tuned from ImageNet weights (see search_spaces/pretrained.py)."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from search_spaces.pretrained import defaults_for, suggest_for


def defaults() -> TrialParams:
    """The original project's frozen-backbone DenseNet121 recipe."""
    return defaults_for("densenet121")


def suggest(trial: optuna.trial.BaseTrial) -> TrialParams:
    """Search fine-tuning of DenseNet121."""
    return suggest_for(trial, "densenet121")
