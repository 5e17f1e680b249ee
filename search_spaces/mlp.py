"""A dense network (the original project tried dense networks too)."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from cifar_hpo.search_spaces._common import suggest_training


def suggest(trial: optuna.trial.BaseTrial, recipe: TrialParams) -> TrialParams:
    """Width and depth of the MLP, dropout, and the shared training choices (not around ``recipe``)."""
    arch = {
        "hidden": trial.suggest_categorical("hidden", [256, 512, 1024, 2048]),
        "depth": trial.suggest_int("depth", 1, 4),
    }
    return TrialParams(
        model="mlp", arch=arch, dropout=trial.suggest_float("dropout", 0.0, 0.5),
        **suggest_training(trial, lr=(1e-4, 3e-3), batch_sizes=[128, 256, 512]),
    )  # fmt: skip
