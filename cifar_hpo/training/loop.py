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

import copy
import dataclasses
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from cifar_hpo import models
from cifar_hpo.device import cpu_threads
from cifar_hpo.errors import UserError
from cifar_hpo.models.registry import DataInit
from cifar_hpo.params import TrialParams
from cifar_hpo.training import augment
from cifar_hpo.training.evaluation import evaluate, evaluate_with, single_pass_unless
from cifar_hpo.training.optim import (
    LOOKAHEAD_IMAGES,
    lookahead_decay,
    lookahead_step,
    lr_factor,
    make_optimizer,
    set_lr,
    update_ema,
)
from cifar_hpo.training.precision import autocast, peak_mem_mb, sync, use_channels_last

if TYPE_CHECKING:
    from cifar_hpo.data import DeviceData


__all__ = ["EpochResult", "History", "StopTraining", "train", "rung_acc"]


# On CUDA the loss is checked for non-finite values every this many steps (and at
# every epoch end): a per-step check would synchronise the GPU each step. On a CPU
# the check is free and runs every step.
CUDA_FINITE_CHECK_EVERY = 25


def finite_check_every(device: torch.device) -> int:
    """Steps between checks of the loss for non-finite values on ``device`` (see `CUDA_FINITE_CHECK_EVERY`).

    At 1 the loss is checked before the optimizer step; at more, the running sum after it.
    """
    return CUDA_FINITE_CHECK_EVERY if device.type == "cuda" else 1


def compile_wanted(params: TrialParams, device: torch.device) -> bool:
    """Whether `train` runs the model through ``torch.compile``: asked for, and on CUDA.

    CUDA only, as it always was: on a CPU it was never measured to pay for its compile
    time. Tests force it on a CPU by replacing this function.
    """
    return params.compile and device.type == "cuda"


def rng_state(device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random state a snapshot records: torch's global one, the batch generator's and, on CUDA, the device's."""
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device, generator: torch.Generator) -> None:
    """Set the random state `rng_state` recorded (a snapshot from a CPU run has no CUDA entry, and needs none)."""
    # RNG states are CPU byte tensors, whatever map_location the snapshot was loaded with.
    torch.set_rng_state(rng["torch"].cpu())
    generator.set_state(rng["generator"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


# Images passed to a model declaring `Capabilities.init_from_data` (fast_cnn's whitening).
DATA_INIT_IMAGES = 5000


# A probe (cooldown branch) at epoch k decays from the current lr to 0 over this share
# of the steps trained so far: a complete short WSD schedule of about k * 1.2 epochs.
PROBE_COOLDOWN_FRAC = 0.2


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


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (snapshots must not alias live weights)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def rung_acc(result: EpochResult) -> float:
    """The accuracy a pruner compares at this epoch: the probe's when one ran, else the EMA's, else the plain one."""
    if result.probe_acc is not None:
        return result.probe_acc
    return result.ema_acc if result.ema_acc is not None else result.val_acc


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
                with autocast(device, params.precision):
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
    models train in channels_last. Precision (`precision.use_bf16`): "auto",
    the default, is bf16 autocast on CUDA and on CPUs with AMX, fp32 on other
    CPUs; "bf16" and "fp32" force one. On CUDA: optional torch.compile. On a
    CPU: `cpu_threads()` threads. What the model offers besides ``forward`` is
    asked of its registry entry (``models.get(params.model).capabilities``):
    a data-dependent initialisation, called once before a fresh run's first
    step; test-time augmentation, switched off for the evaluations before the
    last epoch. Seeded: the same seed, data and model init give the same
    history and weights on a CPU.

    Args:
        model: from `models.build` (its initial weights are the caller's, so seed
            before building for a reproducible run); a wrapper around one must offer
            what ``params.model``'s `Capabilities` declare.
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

    device = data.device
    capabilities = models.get(params.model).capabilities  # what the model offers training beyond forward
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
    history = History(params_count=models.count_params(model), device=str(device))
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
        restore_rng(resume["rng"], device, generator)
        if ema_horizon is not None and resume.get("ema") is not None:
            ema = {k: v.to(device) for k, v in resume["ema"].items()}
        if resume.get("lookahead") is not None:
            average = {k: v.to(device) for k, v in resume["lookahead"].items()}
    elif capabilities.init_from_data:
        # Evenly spaced, not the first N: the images may be stored sorted by class.
        idx = torch.linspace(0, n - 1, min(n, DATA_INIT_IMAGES), device=device).long()
        cast(DataInit, model).init_from_data(augment.normalize(data.train_x[idx], data.mean, data.std))

    forward: nn.Module = model
    if compile_wanted(params, device):
        forward = torch.compile(model)  # type: ignore[assignment]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.cuda.reset_peak_memory_stats(device)
    check_every = finite_check_every(device)
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
            with autocast(device, params.precision):
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
                average = lookahead_step(average, model, lookahead_decay(step, total_steps))
            if ema_horizon is not None:
                ema = update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if check_every > 1 and step % check_every == 0 and not torch.isfinite(loss_sum):
                finite = False
                break
        if not finite or not torch.isfinite(loss_sum):
            history.status = "nonfinite"
            break
        sync(device)
        train_seconds = time.perf_counter() - t0
        probe_acc, probe_steps, ema_acc = None, 0, None
        with single_pass_unless(model, epoch == epochs, tta=capabilities.tta):
            # The eager model: a compiled one would recompile for eval mode and the ragged last batch.
            metrics = evaluate(model, data.eval_x, data.eval_y, mean=data.mean, std=data.std, precision=params.precision)
            if epoch in probe_epochs and epoch < epochs:
                probe_steps = max(1, int(round(PROBE_COOLDOWN_FRAC * step)))
                probe_acc = _probe(model, optimizer, data, params, lr=lr, steps=probe_steps, seed=seed * 1009 + epoch,
                                   drop_last=drop_last, channels_last=channels_last)  # fmt: skip
            if ema is not None and (ema_epochs is None or epoch in ema_epochs):
                ema_acc = evaluate_with(model, ema, data, params.precision)
        result = EpochResult(
            epoch=epoch,
            train_loss=float(loss_sum.item()) / max(1, seen),
            train_acc=float(correct.item()) / max(1, seen),
            val_loss=metrics.loss,
            val_acc=metrics.acc,
            lr=lr,
            seconds=time.perf_counter() - t0,
            images_per_s=seen / max(train_seconds, 1e-9),
            peak_mem_mb=peak_mem_mb(device),
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
                rng = rng_state(device, generator)
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
