"""Evaluation: accuracy, loss, predictions and confusion matrix of a model on a set of images."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_hpo.training import augment
from cifar_hpo.training.precision import autocast, use_channels_last

if TYPE_CHECKING:
    from cifar_hpo.data import DeviceData


@dataclass(frozen=True)
class Metrics:
    """Evaluation of a model on one set of images."""

    acc: float
    loss: float  # mean cross-entropy (no label smoothing)
    predictions: np.ndarray  # int64 (N,)
    confusion: np.ndarray  # int64 (C, C), rows = true class, columns = predicted


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    batch_size: int = 1024,
    precision: str = "fp32",
) -> Metrics:
    """Accuracy, mean loss, predictions and confusion matrix of ``model`` on (x, y).

    Args:
        model: any registry model; put in eval mode for the call, its mode restored after.
        x: uint8 (N, 3, H, W) images on the model's device; y: int64 (N,) labels.
        mean, std: per-channel normalization in [0, 1] units (the training data's).
        batch_size: images per forward pass.
        precision: "fp32", "bf16" or "auto" (bf16 on CUDA and on CPUs with AMX, fp32
            elsewhere: `precision.use_bf16`), as in `TrialParams.precision`.
    """
    was_training = model.training
    model.eval()
    channels_last = use_channels_last(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    preds: list[torch.Tensor] = []
    num_classes = 0
    try:
        for xb, yb in augment.eval_batches(x, y, batch_size, mean, std):
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(xb.device, precision):
                logits = model(xb)
            logits = logits.float()
            num_classes = logits.shape[1]
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            preds.append(logits.argmax(1))
    finally:
        model.train(was_training)
    n = len(y)
    if n == 0:
        return Metrics(float("nan"), float("nan"), np.zeros(0, np.int64), np.zeros((0, 0), np.int64))
    p = torch.cat(preds).cpu().numpy().astype(np.int64)
    t = y.cpu().numpy().astype(np.int64)
    c = max(num_classes, int(t.max()) + 1)
    confusion = np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64)
    return Metrics(acc=float((p == t).mean()), loss=float(loss_sum.item()) / n, predictions=p, confusion=confusion)


@contextlib.contextmanager
def single_pass_unless(model: nn.Module, last: bool, *, tta: bool) -> Iterator[None]:
    """Evaluate with one pass, not the model's test-time augmentation, unless ``last``.

    A model with test-time augmentation (fast_cnn) averages up to 6 passes per
    image in eval mode; the run's epochs before its last are evaluated once per
    image (they rank and prune trials, where TTA changes little and would cost
    several times the evaluation), the last epoch with the model's own level.

    Args:
        model: the model being evaluated.
        last: the run's last epoch: evaluate with the model's own level.
        tta: whether the model has a ``tta`` level attribute, as its registry entry
            declares (``models.get(name).capabilities.tta``); False: nothing to switch.
    """
    if last or not tta:
        yield
        return
    level = model.tta
    model.tta = 0  # type: ignore[assignment]
    try:
        yield
    finally:
        model.tta = level


def evaluate_with(model: nn.Module, state: dict[str, torch.Tensor], data: DeviceData, precision: str) -> float:
    """Validation accuracy of ``model`` with ``state`` loaded; the model's own weights are restored after."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state)
        return evaluate(model, data.eval_x, data.eval_y, mean=data.mean, std=data.std, precision=precision).acc
    finally:
        model.load_state_dict(saved)
