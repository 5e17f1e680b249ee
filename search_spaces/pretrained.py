"""ResNet18 / DenseNet121 fine-tuned from ImageNet weights.

Fine-tune depth counts backbone stages trained besides the new head (0 = head
only, as in the original project), up to the model's stages in the registry
(``cifar_hpo.models.MODELS[model].stages``). Inputs can be upsampled on the
device toward the resolution the weights were trained at (224 px): more
accuracy, quadratically more compute.
"""

from __future__ import annotations

import optuna

from cifar_hpo.params import TrialParams
from cifar_hpo.search_spaces._common import suggest_training


def suggest_for(trial: optuna.trial.BaseTrial, model: str) -> TrialParams:
    """Fine-tune depth, input size, head and the shared training choices."""
    from cifar_hpo.models import get

    arch = {
        "upsample": trial.suggest_categorical("upsample", [0, 64, 128]),
        "head_hidden": trial.suggest_categorical("head_hidden", [128, 256, 512]),
    }
    return TrialParams(
        model=model, pretrained=True, arch=arch,
        finetune_depth=trial.suggest_int("finetune_depth", 0, len(get(model).stages)),
        dropout=trial.suggest_float("dropout", 0.0, 0.5),
        **suggest_training(trial, lr=(1e-5, 3e-3), batch_sizes=[64, 128, 256]),
    )  # fmt: skip
