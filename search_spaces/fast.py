"""fast_cnn, our network built for speed to accuracy, around its default recipe.

The study file's ``recipe`` ("cpu": half-width network, stride-2 stem, lr 0.6;
"gpu": full width, lr 1.5, batch 1024; see ``cifar_hpo.models.MODELS["fast_cnn"]``)
fixes the centre of the search, so every worker searches the same space
whatever machine it runs on.
"""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams


def suggest(trial: optuna.trial.BaseTrial, recipe: TrialParams) -> TrialParams:
    """Learning rate, batch size, regularization and augmentation around ``recipe``."""
    return recipe.replace(
        lr=trial.suggest_float("lr", recipe.lr / 10, recipe.lr * 10, log=True),
        batch_size=trial.suggest_categorical("batch_size", [128, 256, 512, 1024]),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.3),
        aug_strength=trial.suggest_float("aug_strength", 0.0, 1.0),
        warmup_frac=trial.suggest_float("warmup_frac", 0.0, 0.4),
    )
