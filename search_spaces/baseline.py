"""The original project's handcrafted CNN (LeNet-style), searched and as published."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from search_spaces._common import suggest_training


def defaults() -> TrialParams:
    """The original notebook's recipe: Adam lr 0.003, batch 128, flip + rotation, no schedule."""
    return TrialParams(
        model="baseline_cnn", optimizer="adam", lr=3e-3, batch_size=128, schedule="constant",
        aug_strength=1.0, aug_ops=("flip", "rotate"),
    )  # fmt: skip


def suggest(trial: optuna.trial.BaseTrial) -> TrialParams:
    """Search training of the fixed baseline architecture."""
    return TrialParams(model="baseline_cnn", **suggest_training(trial, lr=(1e-4, 1e-2), batch_sizes=[64, 128, 256]))
