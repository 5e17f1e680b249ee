"""fast_cnn, our network built for speed to accuracy, around its tuned recipe."""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams


def defaults() -> TrialParams:
    """fast_cnn's tuned default recipe for this machine (models.default_params).

    The recipe differs by device kind (half-width network on a CPU, the full one on
    CUDA), so a study's workers and its retrain should run on the same kind.
    """
    import torch

    from cifar_hpo.models import default_params

    return default_params("fast_cnn", "cuda" if torch.cuda.is_available() else "cpu")


def suggest(trial: optuna.trial.BaseTrial) -> TrialParams:
    """Learning rate, batch size, regularization and augmentation around the default recipe."""
    base = defaults()
    return base.replace(
        lr=trial.suggest_float("lr", base.lr / 10, base.lr * 10, log=True),
        batch_size=trial.suggest_categorical("batch_size", [128, 256, 512, 1024]),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.3),
        aug_strength=trial.suggest_float("aug_strength", 0.0, 1.0),
        warmup_frac=trial.suggest_float("warmup_frac", 0.0, 0.4),
    )
