"""The training loop: one plain function, no Trainer class.

    cifar-hpo train --model fast_cnn --data ../shared/data/cifar10-jpeg.tar.gz --epochs 3

`train` runs SGD/Adam/AdamW with a per-step learning-rate schedule on a
`DeviceData` (images already on the device, batches augmented there), checks
the loss for non-finite values, evaluates on ``data.eval_x`` after every
epoch and calls ``on_epoch(result, snapshot)``; ``snapshot()`` returns a dict
that, passed back as ``resume=``, continues the run exactly. `evaluate`
computes accuracy, loss, predictions and a confusion matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import resource
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_hpo.device import cpu_has_amx, cpu_threads
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams

if TYPE_CHECKING:
    from cifar_hpo.data import DeviceData

__all__ = [
    "EpochResult", "History", "Metrics", "StopTraining", "train", "evaluate", "make_optimizer", "lr_factor", "rung_acc",
]

# On CUDA the loss is checked for non-finite values every this many steps (and at
# every epoch end): a per-step check would synchronise the GPU each step. On a CPU
# the check is free and runs every step.
CUDA_FINITE_CHECK_EVERY = 25
# Images used to initialise data-dependent first layers (fast_cnn's whitening).
DATA_INIT_IMAGES = 5000
# "wsd" (warmup-stable-decay): the share of all steps spent decaying to 0 at the end.
WSD_DECAY_FRAC = 0.2
# A probe (cooldown branch) at epoch k decays from the current lr to 0 over this share
# of the steps trained so far: a complete short WSD schedule of about k * 1.2 epochs.
PROBE_COOLDOWN_FRAC = 0.2
# Lookahead (TrialParams.lookahead) averages every this many training images: airbench94's
# every 5 steps of 1,024 images, kept per image so that other batch sizes average alike.
LOOKAHEAD_IMAGES = 5 * 1024


class StopTraining(Exception):
    """Raise from ``on_epoch`` to end training early; `train` returns status "stopped"."""


@dataclass(frozen=True)
class EpochResult:
    """What one epoch measured. ``val_*`` are on ``data.eval_x`` (validation, or test in final runs)."""

    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's training batches (with label smoothing)
    train_acc: float  # on augmented training batches, in train mode
    val_loss: float
    val_acc: float
    lr: float  # learning rate at the last step of the epoch
    seconds: float  # this epoch, training + evaluation
    images_per_s: float  # training images per second (without evaluation)
    peak_mem_mb: float  # CUDA: max allocated since train() began; CPU: process max RSS
    # Rung fidelity (None when not measured this epoch): accuracy of a short cooldown
    # branch off the current weights (``probe_epochs``), and of the weights' EMA.
    probe_acc: float | None = None
    probe_steps: int = 0  # extra training steps the probe took (its cost)
    ema_acc: float | None = None


@dataclass
class History:
    """The epochs of one run and how it ended.

    ``status``: "ok", "nonfinite" (a non-finite loss stopped it) or "stopped"
    (``on_epoch`` raised `StopTraining`).
    """

    epochs: list[EpochResult] = field(default_factory=list)
    status: str = "ok"
    params_count: int = 0
    device: str = "cpu"
    seconds: float = 0.0  # wall time of the run, across resumes

    @property
    def best_val_acc(self) -> float:
        """Best validation accuracy over the epochs (0.0 when no epoch finished)."""
        return max((e.val_acc for e in self.epochs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict."""
        return {
            "epochs": [dataclasses.asdict(e) for e in self.epochs],
            "status": self.status,
            "params_count": self.params_count,
            "device": self.device,
            "seconds": self.seconds,
            "best_val_acc": self.best_val_acc,
        }


@dataclass(frozen=True)
class Metrics:
    """Evaluation of a model on one set of images."""

    acc: float
    loss: float  # mean cross-entropy (no label smoothing)
    predictions: np.ndarray  # int64 (N,)
    confusion: np.ndarray  # int64 (C, C), rows = true class, columns = predicted


# ---------------------------------------------------------------- pieces


def _use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast: asked for, or "auto" on CUDA and on CPUs with AMX (`device.cpu_has_amx`)."""
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if _use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(model: nn.Module) -> bool:
    """Whether to train ``model`` in channels_last (NHWC) memory format: when it has convolutions.

    On CUDA tensor cores want NHWC; on this project's 2-core CPU oneDNN's
    convolutions ran faster in NHWC too (fast_cnn fp32 2,200 -> 3,100 img/s,
    bf16 3,300 -> 4,800; baseline_cnn fp32 13,800 -> 16,700). A dense network
    gains nothing.
    """
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


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
    """How strongly `_lookahead` pulls the weights back to their average after ``step`` steps.

    airbench94's schedule: 0.95**5 * (progress)**3, so early training runs free and
    the last steps are averaged; the run's last step ends on the average (1.0).
    """
    if step >= total_steps:
        return 1.0
    return 0.95**5 * (step / total_steps) ** 3


def _lookahead(avg: dict[str, torch.Tensor] | None, model: nn.Module, decay: float) -> dict[str, torch.Tensor]:
    """avg <- decay * avg + (1 - decay) * weights (`_update_ema`), then weights <- avg."""
    avg = _update_ema(avg, model, decay)
    model.load_state_dict(avg)
    return avg


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


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (snapshots must not alias live weights)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rung_acc(result: EpochResult) -> float:
    """The accuracy a pruner compares at this epoch: the probe's when one ran, else the EMA's, else the plain one."""
    if result.probe_acc is not None:
        return result.probe_acc
    return result.ema_acc if result.ema_acc is not None else result.val_acc


def _update_ema(ema: dict[str, torch.Tensor] | None, model: nn.Module, decay: float) -> dict[str, torch.Tensor]:
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


@contextlib.contextmanager
def _single_pass_unless(model: nn.Module, last: bool) -> Iterator[None]:
    """Evaluate with one pass, not the model's test-time augmentation, unless ``last``.

    A model with a ``tta`` level (fast_cnn) averages up to 6 passes per image in
    eval mode; the run's epochs before its last are evaluated once per image
    (they rank and prune trials, where TTA changes little and would cost several
    times the evaluation), the last epoch with the model's own level.
    """
    level = getattr(model, "tta", None)
    if last or not level:
        yield
        return
    model.tta = 0  # type: ignore[assignment]
    try:
        yield
    finally:
        model.tta = level  # type: ignore[assignment]


def _evaluate_with(model: nn.Module, state: dict[str, torch.Tensor], data: DeviceData, precision: str) -> float:
    """Validation accuracy of ``model`` with ``state`` loaded; the model's own weights are restored after."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state)
        return evaluate(model, data.eval_x, data.eval_y, mean=data.mean, std=data.std, precision=precision).acc
    finally:
        model.load_state_dict(saved)


def _probe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DeviceData,
    params: TrialParams,
    *,
    lr: float,
    steps: int,
    seed: int,
    drop_last: bool,
    channels_last: bool,
) -> float:
    """Validation accuracy after a cooldown branch of ``steps`` steps (lr from ``lr`` linearly to 0).

    Weights, optimizer state and the global random state are restored after, and the
    branch draws its batches from its own generator: the run continues as if no probe ran.
    """
    from cifar_hpo import augment

    device = data.device
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.get_rng_state()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    done = 0
    try:
        model.train()
        while done < steps:
            for x, y in augment.train_batches(data, params.batch_size, strength=params.aug_strength, ops=params.aug_ops,
                                              generator=generator, drop_last=drop_last):  # fmt: skip
                if done >= steps:
                    break
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                set_lr(optimizer, lr * (1.0 - done / steps))
                with _autocast(device, params.precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=params.label_smoothing)
                if not torch.isfinite(loss):
                    return 0.0
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
        return evaluate(model, data.eval_x, data.eval_y, mean=data.mean, std=data.std, precision=params.precision).acc
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        torch.set_rng_state(saved_rng)


# ---------------------------------------------------------------- evaluate


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
        precision: "fp32", "bf16" or "auto" (bf16 on CUDA), as in `TrialParams.precision`.
    """
    from cifar_hpo import augment

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
            with _autocast(xb.device, precision):
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


# ---------------------------------------------------------------- train


def train(
    model: nn.Module,
    data: DeviceData,
    params: TrialParams,
    *,
    epochs: int,
    seed: int = 0,
    on_epoch: Callable[[EpochResult, Callable[[], dict[str, Any]]], None] | None = None,
    resume: dict[str, Any] | None = None,
    probe_epochs: Collection[int] = (),
    ema_horizon: float | None = None,
    ema_epochs: Collection[int] | None = None,
) -> History:
    """Train ``model`` on ``data`` for ``epochs`` epochs with the recipe in ``params``.

    The learning rate follows ``params.schedule`` per step over all
    ``epochs``; only parameters with ``requires_grad`` are optimized. Batches
    are augmented on the device by `augment.train_batches`. Convolutional
    models train in channels_last. On CUDA: bf16 autocast (precision "auto"),
    optional torch.compile. On a CPU: `cpu_threads()` threads, fp32 unless
    precision is "bf16" (about 1.5-1.8x faster there, same accuracy). Seeded:
    the same seed, data and model init give the same history and weights on
    a CPU.

    Args:
        model: from `models.build` (its initial weights are the caller's, so seed
            before building for a reproducible run).
        data: training and evaluation tensors on the training device.
        params: the recipe (optimizer, lr, schedule, augmentation, precision, ...).
        epochs: total epochs of the run (a resumed run continues up to this).
        seed: seeds batch order, augmentation and dropout.
        on_epoch: called after every epoch with the result and ``snapshot``;
            call ``snapshot()`` inside it to get a dict for ``resume=`` (tensors on
            the CPU, safe for `checkpoint.save`). Exceptions it raises propagate,
            except `StopTraining`, which ends the run with status "stopped".
        resume: a snapshot from an earlier run of the same params: training
            continues after its epoch with the same weights, optimizer state,
            schedule position and random state.
        probe_epochs: after these epochs (before the last), a cooldown branch
            trains a copy of the weights `PROBE_COOLDOWN_FRAC` of the steps so far
            more, with the lr decaying linearly from its current value to 0, and
            evaluates it (``EpochResult.probe_acc``, its steps in ``probe_steps``);
            the run then continues from the saved weights, optimizer and random
            state, so the run's own history is the same with or without probes.
        ema_horizon: also evaluate an exponential moving average of the weights
            (``EpochResult.ema_acc``), averaging over about this many epochs.
        ema_epochs: evaluate the EMA only after these epochs (a pruner's rungs:
            each evaluation costs a pass over the validation images); None: every epoch.

    Returns:
        The `History`; status "nonfinite" when a non-finite loss stopped the run
        (the partial epoch is not recorded).
    """
    from cifar_hpo import augment
    from cifar_hpo.models import count_params

    device = data.device
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    torch.manual_seed(seed)  # dropout and any other global-RNG use
    model.to(device)
    channels_last = use_channels_last(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    n = len(data.train_y)
    if n == 0:
        raise UserError("no training images: check the data source and --subset")
    # Drop the ragged last batch (steady batch statistics and shapes), unless the
    # training set is smaller than one batch.
    drop_last = n >= params.batch_size
    steps_per_epoch = n // params.batch_size if drop_last else 1
    total_steps = max(1, epochs * steps_per_epoch)
    optimizer = make_optimizer(model, params)
    history = History(params_count=count_params(model), device=str(device))
    step, start_epoch, seconds_before = 0, 0, 0.0
    ema: dict[str, torch.Tensor] | None = None
    average: dict[str, torch.Tensor] | None = None  # lookahead's average of the weights
    lookahead_every = max(1, round(LOOKAHEAD_IMAGES / params.batch_size))
    ema_decay = 1.0 - 1.0 / max(1.0, (ema_horizon or 0.0) * steps_per_epoch)

    if resume is not None:
        if resume.get("params") != params.to_dict():
            raise UserError("the snapshot to resume from was made with different trial parameters; start a new run")
        model.load_state_dict(resume["model_state"] if "model_state" in resume else resume["model"])  # "model": before 2026-11
        optimizer.load_state_dict(resume["optimizer"])
        step, start_epoch = int(resume["step"]), int(resume["epoch"])
        seconds_before = float(resume.get("seconds", 0.0))
        history.epochs = [EpochResult(**e) for e in resume["history"]]
        # RNG states are CPU byte tensors, whatever map_location the snapshot was loaded with.
        torch.set_rng_state(resume["rng"]["torch"].cpu())
        generator.set_state(resume["rng"]["generator"].cpu())
        if device.type == "cuda" and "cuda" in resume["rng"]:
            torch.cuda.set_rng_state(resume["rng"]["cuda"].cpu(), device)
        if ema_horizon is not None and resume.get("ema") is not None:
            ema = {k: v.to(device) for k, v in resume["ema"].items()}
        if resume.get("lookahead") is not None:
            average = {k: v.to(device) for k, v in resume["lookahead"].items()}
    else:
        init = getattr(model, "init_from_data", None)
        if callable(init):
            # Evenly spaced, not the first N: the images may be stored sorted by class.
            idx = torch.linspace(0, n - 1, min(n, DATA_INIT_IMAGES), device=device).long()
            init(augment.normalize(data.train_x[idx], data.mean, data.std))

    forward: nn.Module = model
    if params.compile and device.type == "cuda":
        forward = torch.compile(model)  # type: ignore[assignment]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.cuda.reset_peak_memory_stats(device)
    check_every = 1 if device.type != "cuda" else CUDA_FINITE_CHECK_EVERY
    t_start = time.perf_counter()
    lr = params.lr * lr_factor(params.schedule, max(0, step - 1), total_steps, params.warmup_frac)

    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        finite = True
        flips = augment.alternating_flips(n, epoch, seed, device) if params.alt_flip else None
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = augment.train_batches(
            data,
            params.batch_size,
            strength=params.aug_strength,
            ops=params.aug_ops,
            generator=generator,
            drop_last=drop_last,
            flips=flips,
        )
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = params.lr * lr_factor(params.schedule, step, total_steps, params.warmup_frac)
            set_lr(optimizer, lr)
            with _autocast(device, params.precision):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=params.label_smoothing)
            if check_every == 1 and not torch.isfinite(loss):
                finite = False  # caught before the step: the weights stay finite
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if params.lookahead and (step % lookahead_every == 0 or step == total_steps):
                average = _lookahead(average, model, lookahead_decay(step, total_steps))
            if ema_horizon is not None:
                ema = _update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if check_every > 1 and step % check_every == 0 and not torch.isfinite(loss_sum):
                finite = False
                break
        if not finite or not torch.isfinite(loss_sum):
            history.status = "nonfinite"
            break
        _sync(device)
        train_seconds = time.perf_counter() - t0
        probe_acc, probe_steps, ema_acc = None, 0, None
        with _single_pass_unless(model, epoch == epochs):
            # The eager model: a compiled one would recompile for eval mode and the ragged last batch.
            metrics = evaluate(model, data.eval_x, data.eval_y, mean=data.mean, std=data.std, precision=params.precision)
            if epoch in probe_epochs and epoch < epochs:
                probe_steps = max(1, int(round(PROBE_COOLDOWN_FRAC * step)))
                probe_acc = _probe(model, optimizer, data, params, lr=lr, steps=probe_steps, seed=seed * 1009 + epoch,
                                   drop_last=drop_last, channels_last=channels_last)  # fmt: skip
            if ema is not None and (ema_epochs is None or epoch in ema_epochs):
                ema_acc = _evaluate_with(model, ema, data, params.precision)
        result = EpochResult(
            epoch=epoch,
            train_loss=float(loss_sum.item()) / max(1, seen),
            train_acc=float(correct.item()) / max(1, seen),
            val_loss=metrics.loss,
            val_acc=metrics.acc,
            lr=lr,
            seconds=time.perf_counter() - t0,
            images_per_s=seen / max(train_seconds, 1e-9),
            peak_mem_mb=_peak_mem_mb(device),
            probe_acc=probe_acc,
            probe_steps=probe_steps,
            ema_acc=ema_acc,
        )
        history.epochs.append(result)
        history.seconds = seconds_before + time.perf_counter() - t_start
        if on_epoch is not None:

            def snapshot(
                epoch: int = epoch, step: int = step, ema: dict[str, torch.Tensor] | None = ema,
                average: dict[str, torch.Tensor] | None = average,
            ) -> dict[str, Any]:  # fmt: skip
                rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
                if device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(device)
                return _to_cpu(
                    {
                        "model_state": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "epoch": epoch,
                        "seconds": history.seconds,
                        "history": [dataclasses.asdict(e) for e in history.epochs],
                        "rng": rng,
                        "params": params.to_dict(),
                        "seed": seed,
                        "ema": ema,
                        "lookahead": average,
                    }
                )

            try:
                on_epoch(result, snapshot)
            except StopTraining:
                history.status = "stopped"
                break
    history.seconds = seconds_before + time.perf_counter() - t_start
    return history


# ---------------------------------------------------------------- cifar-hpo train


def params_for(model_name: str, overrides: list[str], device: torch.device | str | None = None) -> TrialParams:
    """`models.default_params` of ``model_name`` with ``--set key=value`` overrides.

    ``arch.*`` overrides are merged into the default arch dict, not replacing it.
    """
    from cifar_hpo.models import default_params
    from cifar_hpo.params import parse_overrides

    base = default_params(model_name, device)
    changes = parse_overrides(overrides)
    changes.pop("model", None)
    names = [f.name for f in dataclasses.fields(base) if f.name != "model"]
    for key, value in changes.items():
        if key not in names:
            raise UserError(f"--set {key}=...: unknown TrialParams field; valid: {', '.join(names)} (and arch.KEY)")
        current = getattr(base, key)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            changes[key] = value = float(value)
        if not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool):
            if key == "arch":
                raise UserError(f"--set arch={value}: set one key of arch at a time, e.g. --set arch.width=64")
            raise UserError(f"--set {key}={value}: must be {type(current).__name__}, like the default {key}={current}")
    if "arch" in changes:
        changes["arch"] = {**base.arch, **changes["arch"]}
    return base.replace(**changes)


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo train``: train one model outside any study, print one line per epoch."""
    from cifar_hpo import checkpoint, data
    from cifar_hpo.device import resolve_device
    from cifar_hpo.models import build

    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.subset is not None and args.subset < 20:
        raise UserError(f"--subset must be >= 20 images, got {args.subset}")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    device = resolve_device(args.device)
    params = params_for(args.model, args.set, device)
    ds = data.load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    split = data.split_dataset(ds, val_fraction=args.val_fraction, subset=args.subset)
    dd = data.trial_data(ds, split, device)
    torch.manual_seed(args.seed)
    model = build(params, dd.num_classes)
    print(
        f"{params.model}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
        f"{len(dd.train_y):,} train / {len(dd.eval_y):,} {dd.eval_name} images (split {split.hash})"
    )
    print("params: " + ", ".join(f"{k}={v}" for k, v in params.to_dict().items() if k != "model"))
    print(f"{'epoch':>5}  {'loss':>7}  {'train':>6}  {dd.eval_name + '_acc':>7}  {'lr':>8}  {'img/s':>7}  {'s':>6}")

    def show(r: EpochResult, _snapshot: Callable[[], dict[str, Any]]) -> None:
        print(
            f"{r.epoch:>5}  {r.train_loss:>7.4f}  {r.train_acc:>6.3f}  {r.val_acc:>7.4f}  {r.lr:>8.2e}  "
            f"{r.images_per_s:>7.0f}  {r.seconds:>6.1f}",
            flush=True,
        )

    history = train(model, dd, params, epochs=args.epochs, seed=args.seed, on_epoch=show)
    print(f"status {history.status}; best {dd.eval_name} acc {history.best_val_acc:.4f}; {history.seconds:.1f} s")
    if args.save is not None:
        checkpoint.save(
            {
                "model_state": _to_cpu(model.state_dict()),
                "params": params.to_dict(),
                "classes": list(dd.classes),
                "mean": list(dd.mean),
                "std": list(dd.std),
                "split_hash": dd.split_hash,
                "seed": args.seed,
                "history": history.to_dict(),
            },
            args.save,
        )
        print(f"saved {args.save}")
    return 0 if history.status == "ok" else 1
