"""Pruners and the rung fidelity they compare: the one module that knows each pruner kind.

    pruner = make_pruner(spec)        # the study's pruner (study.create, study.worker)
    words = pruner_words(spec)        # what the dashboard note says about it (study.note)
    cifar-hpo bench search --data ../shared/data/cifar10-jpeg.tar.gz   # replays pruner_for(kind, ...) on recorded curves

`PRUNERS` maps each ``[pruner] kind`` of a study file to how its Optuna pruner
is built, the epochs where it may prune (its rungs) and its words in the note.
The study file's validation (`spec`) checks ``kind`` against `PRUNERS` and
``fidelity`` against `FIDELITIES`, so a new pruner is an entry here, a check in
`spec` if it needs a new setting, and a test.

A pruner compares trials at rung epochs. How the accuracy at a rung is
measured is the *fidelity* (``[pruner] fidelity`` in a study file):

- ``plain``: the accuracy of the trial's weights after the epoch, the trial's
  own schedule unchanged. The default of every bundled study, with successive
  halving at reduction factor 4 (best quarter kept at epochs 1, 4, 16, ...);
  measured best on airbench's recipe, see docs/pruning.md.
- ``probe``: the trial trains with a warmup-stable-decay schedule
  (``schedule = "wsd"``, `trial_params`) and at each rung from epoch
  `PROBE_FROM_EPOCH` up to the start of its own final decay a short cooldown
  branch off the stable weights is evaluated while the trial continues
  (`train.train`'s ``probe_epochs``); the branch's steps are real cost and
  counted by ``bench search``'s replay. An option (the earlier default).
- ``ema``: the accuracy of an EMA of the weights (one extra evaluation per rung).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from cifar_hpo.models.registry import apply_changes
from cifar_hpo.params import TrialParams
from cifar_hpo.study.search_space import suggest_params
from cifar_hpo.training.optim import WSD_DECAY_FRAC

FIDELITIES = ("plain", "probe", "ema")  # what a rung compares (above); the note says it with `rung_value_words`


EMA_HORIZON_EPOCHS = 0.5  # the EMA fidelity averages over about this many epochs


# Rungs before this epoch compare the plain accuracy even with the probe fidelity: after
# one epoch most configurations are still warming up (warmup_frac up to 0.4 of the
# trial), so a cooldown adds little there and would cost a fifth of an epoch per trial.
PROBE_FROM_EPOCH = 2


# Cost of one evaluation of the validation split, in training epochs, per validation
# image per training image: a forward pass without augmentation is about a third of a
# training step (forward + backward). Charged for the EMA evaluation, which is extra work.
EVAL_COST_PER_IMAGE = 1 / 3


# ---------------------------------------------------------------- the pruner kinds


@dataclass(frozen=True)
class PrunerArgs:
    """What every pruner kind is built from: a study's ``[pruner]`` settings and its epochs per trial.

    Each kind reads the settings it needs (`spec.PrunerSpec` says which); resources are epochs.
    """

    min_resource: int
    reduction_factor: int
    epochs: int
    n_startup_trials: int
    n_warmup_steps: int
    keep: int


@dataclass(frozen=True)
class PrunerKind:
    """One ``[pruner] kind``: its Optuna pruner, its rungs and its words in the dashboard note."""

    build: Callable[[PrunerArgs], optuna.pruners.BasePruner]
    rungs: Callable[[int, int, int], list[int]]  # (min_resource, reduction_factor, epochs) -> epochs where it may prune
    words: Callable[[PrunerArgs], str]  # completes "pruner ..." in the note


def geometric_rungs(min_resource: int, reduction_factor: int, epochs: int) -> list[int]:
    """Optuna's successive-halving rungs ``min_resource * reduction_factor**k`` below ``epochs``.

    Hyperband's brackets start at successive rungs, so its rungs are the same set;
    rung_top_k uses them too.
    """
    out, r = [], min_resource
    while r < epochs:
        out.append(r)
        r *= reduction_factor
    return out


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
        self._rungs = set(geometric_rungs(min_resource, reduction_factor, epochs))

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


def _halving_words(name: str, a: PrunerArgs) -> str:
    return f"{name} on epochs (at least {a.min_resource} epoch(s) per trial, keeps 1/{a.reduction_factor} per rung)"


def _rung_top_k_words(a: PrunerArgs) -> str:
    rungs = ", ".join(map(str, geometric_rungs(a.min_resource, a.reduction_factor, a.epochs))) or "none"
    return (f"rung top-{a.keep} on epochs (at least {a.min_resource} epoch(s) per trial; at the rungs, epochs {rungs}, "
            f"a trial continues while fewer than {a.keep} trial(s) did better there)")  # fmt: skip


def promotion_rungs(min_resource: int, reduction_factor: int, epochs: int) -> list[int]:
    """Pause and promote's rungs: those of `geometric_rungs` that leave a whole step after them (``rung * rf <= epochs``).

    A rung right before the end (epoch 9 of 10 at rf 3) saves an epoch per trial it stops, and stops
    trials whose accuracy is all but final: their value is lost to the study's best (a stopped trial
    is pruned), so it cost more than it saved in ``bench search`` (docs/pruning.md).
    """
    rungs, r = [], min_resource
    while r * reduction_factor <= epochs:
        rungs.append(r)
        r *= reduction_factor
    return rungs


def _promote_words(a: PrunerArgs) -> str:
    rungs = ", ".join(map(str, promotion_rungs(a.min_resource, a.reduction_factor, a.epochs))) or "none"
    return (f"pause and promote on epochs (at the rungs, epochs {rungs}, a trial goes on while it ranks in the top "
            f"1/{a.reduction_factor} of the trials that reached that rung, and is paused with its snapshot otherwise; "
            "a paused trial is resumed when it ranks there later; once every trial has begun, at least one goes on "
            "from each rung and the rest are stopped)")  # fmt: skip


def _median_words(a: PrunerArgs) -> str:
    return f"median (never in the first {a.n_startup_trials} trials nor before epoch {a.n_warmup_steps + 1})"


PRUNERS: dict[str, PrunerKind] = {  # the order of the study file's error message
    # Pause and promote (study.scheduling): the scheduler decides at the rungs, Optuna's pruner never prunes.
    "promote": PrunerKind(
        build=lambda a: optuna.pruners.NopPruner(),
        rungs=promotion_rungs,
        words=_promote_words,
    ),
    "hyperband": PrunerKind(
        build=lambda a: optuna.pruners.HyperbandPruner(
            min_resource=a.min_resource, max_resource=a.epochs, reduction_factor=a.reduction_factor
        ),
        rungs=geometric_rungs,
        words=lambda a: _halving_words("hyperband", a),
    ),
    "successive_halving": PrunerKind(
        build=lambda a: optuna.pruners.SuccessiveHalvingPruner(min_resource=a.min_resource, reduction_factor=a.reduction_factor),
        rungs=geometric_rungs,
        words=lambda a: _halving_words("successive halving", a),
    ),
    "rung_top_k": PrunerKind(
        build=lambda a: RungTopKPruner(
            keep=a.keep, min_resource=a.min_resource, reduction_factor=a.reduction_factor, epochs=a.epochs
        ),
        rungs=geometric_rungs,
        words=_rung_top_k_words,
    ),
    "median": PrunerKind(
        build=lambda a: optuna.pruners.MedianPruner(n_startup_trials=a.n_startup_trials, n_warmup_steps=a.n_warmup_steps),
        rungs=lambda min_resource, reduction_factor, epochs: list(range(1, epochs)),  # it compares every epoch
        words=_median_words,
    ),
    "none": PrunerKind(
        build=lambda a: optuna.pruners.NopPruner(),
        rungs=lambda min_resource, reduction_factor, epochs: [],
        words=lambda a: "none (every trial trains all its epochs)",
    ),
}


def _kind(kind: str) -> PrunerKind:
    try:
        return PRUNERS[kind]
    except KeyError:
        raise ValueError(f"unknown pruner kind {kind!r}; valid: {', '.join(PRUNERS)}") from None


def pruner_args(spec: Any) -> PrunerArgs:
    """The settings of ``spec``'s (a StudySpec's) pruner: its ``[pruner]`` table and epochs per trial."""
    p = spec.pruner
    return PrunerArgs(min_resource=p.min_resource, reduction_factor=p.reduction_factor, epochs=spec.epochs,
                      n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps, keep=p.keep)  # fmt: skip


def make_pruner(spec: Any) -> optuna.pruners.BasePruner:
    """The Optuna pruner of ``spec`` (a StudySpec), as every worker of the study builds it."""
    return _kind(spec.pruner.kind).build(pruner_args(spec))


def pruner_for(kind: str, *, min_resource: int, reduction_factor: int, epochs: int,
               n_startup_trials: int = 5, n_warmup_steps: int = 1, keep: int = 1) -> optuna.pruners.BasePruner:  # fmt: skip
    """The Optuna pruner of ``kind`` outside a study file (``bench search``'s replay); resources are epochs.

    The defaults are `spec.PrunerSpec`'s (a test keeps them equal), so a replay of a
    kind builds what a study file of that kind would.
    """
    return _kind(kind).build(PrunerArgs(min_resource, reduction_factor, epochs, n_startup_trials, n_warmup_steps, keep))


def rung_epochs(kind: str, min_resource: int, reduction_factor: int, epochs: int) -> list[int]:
    """Epochs (< ``epochs``) where ``kind`` may prune: Optuna's rungs ``min_resource * rf**k``; median: every epoch."""
    return _kind(kind).rungs(min_resource, reduction_factor, epochs)


def pruner_words(spec: Any) -> str:
    """``spec``'s (a StudySpec's) pruner in the dashboard note's words."""
    return _kind(spec.pruner.kind).words(pruner_args(spec))


# ---------------------------------------------------------------- the fidelities


def rung_value_words(spec: Any) -> str | None:
    """What the rungs of ``spec`` (a StudySpec) compare instead of the plain accuracy, in the note's words.

    None when every rung compares the plain accuracy: the plain fidelity, a study that
    never prunes, or rungs where no probe or EMA evaluation runs.
    """
    if probe_epochs(spec):
        return "at probe epochs, the accuracy of the short cooldown probe the pruner ranks on"
    if ema_epochs(spec):
        return "at rung epochs, the accuracy of the average (EMA) of the weights the pruner ranks on"
    return None


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


def trial_params(spec: Any, params: TrialParams) -> TrialParams:
    """``params`` as the study's fidelity trains them: the probe fidelity needs the wsd schedule.

    A study that never prunes (kind "none") keeps the search space's schedule.
    """
    if getattr(spec.pruner, "fidelity", "plain") == "probe" and spec.pruner.kind != "none":
        return params.replace(schedule="wsd")
    return params


def trained_params(spec: Any, trial: optuna.trial.BaseTrial) -> TrialParams:
    """What a trial of ``spec`` (a StudySpec) trains with: its search space's suggestion under the fidelity, then ``run --set``.

    ``trial``: an Optuna trial, or a ``FixedTrial`` of a finished trial's params. The
    objective and retrain's replay both call this, so a replay rebuilds what was trained.
    """
    return apply_changes(trial_params(spec, suggest_params(spec, trial)), getattr(spec, "params", {}))


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
