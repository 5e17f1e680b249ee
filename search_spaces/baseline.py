"""The original project's handcrafted CNN (LeNet-style), searched; its default recipe is in cifar_hpo.models."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from cifar_hpo.search_spaces._common import suggest_training


def suggest(trial: optuna.trial.BaseTrial, recipe: TrialParams) -> TrialParams:
    """Search training of the fixed baseline architecture (not around ``recipe``)."""
    return TrialParams(model="baseline_cnn", **suggest_training(trial, lr=(1e-4, 1e-2), batch_sizes=[64, 128, 256]))
