"""ResNet18 / DenseNet121 fine-tuned from ImageNet weights.

Fine-tune depth counts backbone stages trained besides the new head (0 = head
only, as in the original project). Inputs can be upsampled on the device
toward the resolution the weights were trained at (224 px): more accuracy,
quadratically more compute.
"""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from search_spaces._common import suggest_training

MAX_DEPTH = {"resnet18": 5, "densenet121": 5}


def defaults_for(model: str) -> TrialParams:
    """The original project's recipe: frozen backbone, Adam lr 0.003 on the head."""
    return TrialParams(
        model=model, pretrained=True, finetune_depth=0, optimizer="adam", lr=3e-3, batch_size=128,
        dropout=0.2, aug_strength=1.0, aug_ops=("flip", "rotate"), arch={"head_hidden": 256},
    )  # fmt: skip


def suggest_for(trial: optuna.trial.BaseTrial, model: str) -> TrialParams:
    """Fine-tune depth, input size, head and the shared training choices."""
    arch = {
        "upsample": trial.suggest_categorical("upsample", [0, 64, 128]),
        "head_hidden": trial.suggest_categorical("head_hidden", [128, 256, 512]),
    }
    return TrialParams(
        model=model, pretrained=True, arch=arch,
        finetune_depth=trial.suggest_int("finetune_depth", 0, MAX_DEPTH[model]),
        dropout=trial.suggest_float("dropout", 0.0, 0.5),
        **suggest_training(trial, lr=(1e-5, 3e-3), batch_sizes=[64, 128, 256]),
    )  # fmt: skip
