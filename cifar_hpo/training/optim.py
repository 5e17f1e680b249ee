"""Optimizers and learning-rate schedules: parameter groups, per-step lr, lookahead and EMA averaging of weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams

# "wsd" (warmup-stable-decay): the share of all steps spent decaying to 0 at the end.
WSD_DECAY_FRAC = 0.2


# Lookahead (TrialParams.lookahead) averages every this many training images: airbench94's
# every 5 steps of 1,024 images, kept per image so that other batch sizes average alike.
LOOKAHEAD_IMAGES = 5 * 1024


def make_optimizer(model: nn.Module, params: TrialParams) -> torch.optim.Optimizer:
    """The optimizer of ``params`` over the parameters with ``requires_grad``.

    Weight decay applies to weight matrices and conv kernels only; biases and
    normalization parameters (1-D tensors) are not decayed. Normalization
    parameters learn at ``params.norm_lr_scale`` times the lr: each group's
    ``lr_scale`` multiplies the scheduled lr (`set_lr`).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UserError(f"model {params.model} has no trainable parameters; raise finetune_depth or check the model")
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for p in m.parameters(recurse=False)
    }  # fmt: skip
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": params.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in trainable if p.ndim <= 1 and id(p) not in norm_ids], "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": [p for p in trainable if p.ndim <= 1 and id(p) in norm_ids], "weight_decay": 0.0,
         "lr_scale": params.norm_lr_scale},
    ]  # fmt: skip
    groups = [g for g in groups if g["params"]]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, nesterov=params.momentum > 0)
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=params.lr, betas=(params.momentum, 0.999))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (`make_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lookahead_decay(step: int, total_steps: int) -> float:
    """How strongly `lookahead_step` pulls the weights back to their average after ``step`` steps.

    airbench94's schedule: 0.95**5 * (progress)**3, so early training runs free and
    the last steps are averaged; the run's last step ends on the average (1.0).
    """
    if step >= total_steps:
        return 1.0
    return 0.95**5 * (step / total_steps) ** 3


def lookahead_step(avg: dict[str, torch.Tensor] | None, model: nn.Module, decay: float) -> dict[str, torch.Tensor]:
    """avg <- decay * avg + (1 - decay) * weights (`update_ema`), then weights <- avg."""
    avg = update_ema(avg, model, decay)
    model.load_state_dict(avg)
    return avg


def update_ema(ema: dict[str, torch.Tensor] | None, model: nn.Module, decay: float) -> dict[str, torch.Tensor]:
    """EMA of every floating tensor of the state (BatchNorm statistics included); other tensors copied."""
    with torch.no_grad():
        state = model.state_dict()
        if ema is None:
            return {k: v.detach().clone() for k, v in state.items()}
        for k, v in state.items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
            else:
                ema[k].copy_(v)
    return ema


def lr_factor(schedule: str, step: int, total_steps: int, warmup_frac: float) -> float:
    """Multiplier of the peak lr at 0-based ``step`` of ``total_steps``.

    All schedules warm up linearly over ``warmup_frac`` of the steps (from
    1/warmup_steps, never 0). Then: "constant" stays at 1; "cosine" decays
    along a half cosine; "onecycle" decays linearly (the triangular one-cycle
    schedule of the fast CIFAR-10 recipes); "wsd" stays at 1 and decays
    linearly over the last `WSD_DECAY_FRAC` of the steps (its stable phase does
    not depend on the run's length, so an early epoch is trained as it would be
    in a shorter run: the rung fidelity of `probe_epochs`). All decays reach 0
    just after the last step, so no step is wasted at lr 0.
    """
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, int(round(WSD_DECAY_FRAC * total_steps)))
        start = max(warmup, total_steps - decay)
        return 1.0 if step < start else max(0.0, 1.0 - (step - start) / max(1, total_steps - start))
    # [0, 1) through the decay: the first decay step runs at the peak, the last one
    # still at a small positive lr (a step at lr 0 would be wasted).
    t = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 - t
