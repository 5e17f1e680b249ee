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
    from cifar_hpo.train import WSD_DECAY_FRAC

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


# ---------------------------------------------------------------- the study report (cifar-hpo report)


def study_pruning_data(study: optuna.Study) -> dict[str, Any]:
    """Best value vs epochs consumed, and each epoch's rank correlation with the final value.

    Epochs consumed are the epochs each finished trial reported, in completion
    order (cooldown probes are not counted here; ``bench search`` counts them).
    The correlation uses the study's own completed trials: the accuracy they
    reported at epoch k against their final value, so a user sees whether the
    rungs their pruner compares rank trials as the end does.
    """
    from optuna.trial import TrialState

    from cifar_hpo.bench.search import spearman

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    done.sort(key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0, t.number))
    epochs, best, points = 0, None, []
    for t in done:
        epochs += len(t.intermediate_values)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = t.value if best is None else max(best, t.value)
        points.append({"trial": t.number, "state": t.state.name.lower(), "epochs": epochs, "best": best,
                       "trial_epochs": len(t.intermediate_values)})  # fmt: skip
    complete = [t for t in done if t.state == TrialState.COMPLETE and t.value is not None and t.intermediate_values]
    pruned_at = sorted({max(t.intermediate_values) for t in done if t.state == TrialState.PRUNED and t.intermediate_values})
    last = max((max(t.intermediate_values) for t in complete), default=0)
    rho = {}
    for e in range(1, last):
        pairs = [(t.intermediate_values[e], float(t.value or 0.0)) for t in complete if e in t.intermediate_values]
        if len(pairs) >= 3:
            rho[e] = spearman([a for a, _ in pairs], [b for _, b in pairs])
    return {"study": study.study_name, "points": points, "spearman": rho, "pruned_at": pruned_at,
            "complete": len(complete), "pruned": sum(t.state == TrialState.PRUNED for t in done)}  # fmt: skip


def pruning_line(data: dict[str, Any]) -> str:
    """One line a user can act on: how well the pruned-at epochs rank this study's completed trials."""
    name, rho = data["study"], data["spearman"]
    if data["complete"] < 3 or not rho:
        return f"{name}: pruning: too few completed trials ({data['complete']}) to check how well early epochs rank"
    epochs = [e for e in data["pruned_at"] if e in rho] or sorted(rho)[:3]
    shown = ", ".join(f"epoch {e} {rho[e]:+.2f}" for e in epochs)
    worst = min(rho[e] for e in epochs)
    advice = ("early epochs rank trials as the end does" if worst >= 0.7 else
              "early epochs rank trials poorly: pruning there may drop good trials; raise [pruner] min_resource "
              "or use fidelity = \"probe\"")  # fmt: skip
    return (f"{name}: pruning: rank correlation (Spearman) of the accuracy at the rungs with the final accuracy, "
            f"over {data['complete']} completed trials: {shown}; {advice}")


def draw_pruning(data: dict[str, Any], path: Any) -> Any:
    """Best validation accuracy vs epochs consumed; pruned trials marked where they stopped."""
    from cifar_hpo.plots import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    pts = [p for p in data["points"] if p["best"] is not None]
    ax.step([p["epochs"] for p in pts], [100 * p["best"] for p in pts], where="post", color="tab:blue", label="best so far")
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:red")):
        sel = [p for p in pts if p["state"] == state]
        ax.plot([p["epochs"] for p in sel], [100 * p["best"] for p in sel], marker, color=color, ls="none",
                label=f"{state} trial ({data[state]})")  # fmt: skip
    ax.set_xlabel("epochs consumed (all trials)")
    ax.set_ylabel("best validation accuracy (%)")
    ax.set_title(f"{data['study']}: best found vs epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
