"""ResNet18 fine-tuned from ImageNet weights (see search_spaces/pretrained.py)."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from cifar_hpo.search_spaces.pretrained import suggest_for


def suggest(trial: optuna.trial.BaseTrial, recipe: TrialParams) -> TrialParams:
    """Search fine-tuning of ResNet18 from its ImageNet weights (not around recipe, which trains from scratch)."""
    return suggest_for(trial, "resnet18")
