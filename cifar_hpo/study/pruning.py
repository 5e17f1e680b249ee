"""Pruners and the rung fidelity they compare: one place for the study, the replay and the report.

    cifar-hpo bench search --data ../shared/data/cifar10-jpeg.tar.gz   # measures the choices made here

A pruner compares trials at rung epochs. How the accuracy at a rung is
measured is the *fidelity* (``[pruner] fidelity`` in a study file):

- ``plain``: the accuracy of the trial's weights after the epoch (today's
  behaviour; with a schedule that decays over the whole trial it is measured at
  a high learning rate and ranks configurations poorly).
- ``probe``: the trial trains with a warmup-stable-decay schedule
  (``schedule = "wsd"``) and at each rung from epoch `PROBE_FROM_EPOCH` up to the
  start of its own final decay a short cooldown branch off the stable weights is
  evaluated while the trial continues (`train.train`'s ``probe_epochs``); the
  branch's steps are real cost and counted by the replay. The default of every
  bundled study (successive halving, reduction factor 4); see docs/pruning.md.
- ``ema``: the accuracy of an EMA of the weights (one extra evaluation per epoch).
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from cifar_hpo.training.optim import WSD_DECAY_FRAC

FIDELITIES = ("plain", "probe", "ema")


EMA_HORIZON_EPOCHS = 0.5  # the EMA fidelity averages over about this many epochs


# Rungs before this epoch compare the plain accuracy even with the probe fidelity: after
# one epoch most configurations are still warming up (warmup_frac up to 0.4 of the
# trial), so a cooldown adds little there and would cost a fifth of an epoch per trial.
PROBE_FROM_EPOCH = 2


# Cost of one evaluation of the validation split, in training epochs, per validation
# image per training image: a forward pass without augmentation is about a third of a
# training step (forward + backward). Charged for the EMA evaluation, which is extra work.
EVAL_COST_PER_IMAGE = 1 / 3


class RungTopKPruner(optuna.pruners.BasePruner):
    """At each rung epoch, keep a trial only if it is among the ``keep`` best that reached that rung.

    Successive halving keeps the best 1/rf of the trials at a rung, so the
    epochs it spends grow with the trial count; a sequential study cannot
    train every trial to the rung first and then pick the best k (the
    "one epoch, then the top k" baseline). This rule is the sequential
    version: a trial continues past a rung when fewer than ``keep`` trials
    (complete, pruned or running) reported a better value at that epoch.
    The first ``keep`` trials always continue; later ones mostly stop at the
    first rung, and the number that continue grows like ``keep * ln(trials)``.
    Its rungs are successive halving's: ``min_resource * reduction_factor**i``.
    """

    def __init__(self, *, keep: int, min_resource: int, reduction_factor: int, epochs: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._keep = keep
        self._rungs = set(rung_epochs("successive_halving", min_resource, reduction_factor, epochs))

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self._rungs:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        better = 0
        for t in study.get_trials(deepcopy=False):
            if t.number != trial.number and step in t.intermediate_values and t.intermediate_values[step] > value:
                better += 1
                if better >= self._keep:
                    return True
        return False


def rung_epochs(kind: str, min_resource: int, reduction_factor: int, epochs: int) -> list[int]:
    """Epochs (< ``epochs``) where ``kind`` may prune: Optuna's rungs ``min_resource * rf**k``.

    Hyperband's brackets start at successive rungs, so its rungs are the same set;
    rung_top_k uses them too. Median: every epoch.
    """
    if kind == "median":
        return list(range(1, epochs))
    if kind not in ("hyperband", "successive_halving", "rung_top_k"):
        return []
    out, r = [], min_resource
    while r < epochs:
        out.append(r)
        r *= reduction_factor
    return out


def make_pruner(kind: str, *, min_resource: int, reduction_factor: int, epochs: int,
                n_startup_trials: int = 5, n_warmup_steps: int = 1, keep: int = 2) -> optuna.pruners.BasePruner:  # fmt: skip
    """The Optuna pruner of ``kind``; resources are epochs."""
    if kind == "rung_top_k":
        return RungTopKPruner(keep=keep, min_resource=min_resource, reduction_factor=reduction_factor, epochs=epochs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=epochs, reduction_factor=reduction_factor)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    return optuna.pruners.NopPruner()


def probe_epochs(spec: Any) -> list[int]:
    """The epochs where a trial of ``spec`` (a StudySpec) runs a cooldown probe: its pruner's rungs."""
    p = spec.pruner
    if getattr(p, "fidelity", "plain") != "probe":
        return []
    return [e for e in rung_epochs(p.kind, p.min_resource, p.reduction_factor, spec.epochs) if probes_at(e, spec.epochs)]


def probes_at(epoch: int, epochs: int) -> bool:
    """Whether a rung at ``epoch`` of an ``epochs``-epoch wsd trial runs a probe.

    Not before `PROBE_FROM_EPOCH`, and not once the trial's own final decay has begun
    (after ``(1 - WSD_DECAY_FRAC) * epochs``): the trial is cooling down by itself there.
    """
    return PROBE_FROM_EPOCH <= epoch <= (1 - WSD_DECAY_FRAC) * epochs


def trial_params(spec: Any, params: Any) -> Any:
    """``params`` as the study's fidelity trains them: the probe fidelity needs the wsd schedule.

    A study that never prunes (kind "none") keeps the search space's schedule.
    """
    if getattr(spec.pruner, "fidelity", "plain") == "probe" and spec.pruner.kind != "none":
        return params.replace(schedule="wsd")
    return params


def ema_horizon(spec: Any) -> float | None:
    """EMA horizon in epochs for the ema fidelity, else None (no EMA kept)."""
    return EMA_HORIZON_EPOCHS if getattr(spec.pruner, "fidelity", "plain") == "ema" and spec.pruner.kind != "none" else None


def ema_epochs(spec: Any) -> list[int]:
    """The epochs where a trial of ``spec`` evaluates its EMA (ema fidelity): its pruner's rungs."""
    p = spec.pruner
    if ema_horizon(spec) is None:
        return []
    return rung_epochs(p.kind, p.min_resource, p.reduction_factor, spec.epochs)


def eval_cost(val_fraction: float) -> float:
    """One extra pass over a study's validation images, in training epochs of that study.

    A forward pass without augmentation costs about a third of a training step
    (`EVAL_COST_PER_IMAGE`), and the validation split holds
    ``val_fraction / (1 - val_fraction)`` images per training image (1/9 at the 9:1 split).
    """
    return val_fraction / (1.0 - val_fraction) * EVAL_COST_PER_IMAGE
