"""Choices shared by several search spaces (optimizer, schedule, regularization)."""

from __future__ import annotations

from typing import Any

import optuna


def suggest_training(trial: optuna.trial.BaseTrial, *, lr: tuple[float, float], batch_sizes: list[int],
                     optimizers: tuple[str, ...] = ("adam", "adamw", "sgd")) -> dict[str, Any]:
    """Optimizer, learning rate (log scale), batch size, schedule and regularization."""
    optimizer = trial.suggest_categorical("optimizer", list(optimizers))
    out: dict[str, Any] = {
        "optimizer": optimizer,
        "lr": trial.suggest_float("lr", *lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", batch_sizes),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 5e-2, log=True),
        "schedule": trial.suggest_categorical("schedule", ["onecycle", "cosine"]),
        "warmup_frac": trial.suggest_float("warmup_frac", 0.0, 0.3),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "aug_strength": trial.suggest_float("aug_strength", 0.0, 1.0),
    }
    if optimizer == "sgd":
        # SGD wants a far larger step than Adam: scale the suggestion instead of
        # a second learning-rate parameter, so lr stays one axis for importances.
        out["lr"] *= 30.0
        out["momentum"] = trial.suggest_float("momentum", 0.8, 0.95)
    return out
