"""Training: one plain loop over data already on the device, no Trainer class.

    from cifar_hpo import training
    history = training.train(model, data, params, epochs=10, seed=0, on_epoch=show)

- `loop`: ``train(model, data, params, *, epochs, seed, on_epoch, resume, ...) -> History``,
  snapshots that resume exactly, the cooldown probe of the pruning fidelity.
- `optim`: optimizer groups, lr schedules, lookahead and EMA averaging.
- `evaluation`: accuracy, loss, predictions, confusion matrix.
- `precision`: bf16 autocast where it pays, channels_last, device timing and memory.
- `augment`: batches augmented on the device (no PIL, no worker processes).

What training asks of a model (data-dependent initialisation, test-time augmentation
levels) is declared in its registry entry (`cifar_hpo.models.Model`).
"""

from cifar_hpo.training.evaluation import Metrics, evaluate
from cifar_hpo.training.loop import EpochResult, History, StopTraining, rung_acc, train
from cifar_hpo.training.optim import lr_factor, make_optimizer, set_lr

__all__ = ["EpochResult", "History", "Metrics", "StopTraining", "evaluate", "lr_factor", "make_optimizer", "rung_acc", "set_lr", "train"]
