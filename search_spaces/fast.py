"""fast_cnn, our network built for speed to accuracy, around its default recipe.

The study file's ``recipe`` (airbench94's network and recipe, "cpu": batch 256,
lr 0.375; "gpu": batch 1024, lr 1.5; see ``cifar_hpo.models.MODELS["fast_cnn"]``)
fixes the centre of the search, so every worker searches the same space
whatever machine it runs on. Lookahead, test-time augmentation and the network
stay as the recipe has them (each measured to pay, README); the BatchNorm-shift
lr multiplier is searched around the recipe's 64.
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
        norm_lr_scale=trial.suggest_float("norm_lr_scale", recipe.norm_lr_scale / 8, recipe.norm_lr_scale * 8, log=True),
    )
