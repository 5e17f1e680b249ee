"""``cifar-hpo bench pruning``: the same small study with the default pruner and with none.

    cifar-hpo bench pruning --data ../shared/data/cifar10-jpeg.tar.gz --json

Both studies use the `fast` study file's model, search space and sampler
seed, a stratified subset of real images and a few epochs per trial, in
throwaway SQLite databases. Reported: total epochs trained and best
validation accuracy of each, and their ratios. Target: the pruned study
trains <= 35% of the epochs of the unpruned one, with its best within 1 point.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import optuna

from cifar_hpo.bench import emit
from cifar_hpo.run import load_data, open_study, work
from cifar_hpo.spec import PrunerSpec, StudySpec, load_spec


def run_study(spec: StudySpec, data: object, folder: Path) -> dict[str, float]:
    """Run ``spec`` to completion in a fresh database; return epochs trained and best value."""
    url = f"sqlite:///{folder}/{spec.name}.db"
    started = time.time()
    open_study(spec, url, data.split_hash)  # type: ignore[attr-defined]
    work(spec, url, folder, data, seed=spec.seed, prefix=f"[{spec.name}] ")  # the same draws in both studies
    study = optuna.load_study(study_name=spec.name, storage=url)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    return {
        "epochs": float(sum(len(t.intermediate_values) for t in trials)),
        "best": float(study.best_value),
        "pruned": float(sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)),
        "seconds": time.time() - started,
    }


def main(args: argparse.Namespace) -> int:
    """Run both studies side by side and print the comparison."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_spec("fast").with_overrides(epochs=args.epochs, trials=args.trials, data=args.data, subset=args.subset)
    base = base.replace(seed=args.seed)
    if args.pruner or args.reduction_factor:
        chosen = dataclasses.replace(
            base.pruner, kind=args.pruner or base.pruner.kind, reduction_factor=args.reduction_factor or base.pruner.reduction_factor
        )
        base = base.replace(pruner=chosen)
    data = load_data(base, args)
    pruned_spec = base.replace(name="pruned")
    none_spec = base.replace(name="unpruned", pruner=dataclasses.replace(PrunerSpec(), kind="none"))
    with tempfile.TemporaryDirectory(prefix="cifar-hpo-bench-") as tmp:
        pruned = run_study(pruned_spec, data, Path(tmp))
        unpruned = run_study(none_spec, data, Path(tmp))
    result = {
        "pruner": f"{base.pruner.kind} (min_resource={base.pruner.min_resource}, reduction_factor={base.pruner.reduction_factor})",
        "trials": base.trials,
        "epochs_per_trial": base.epochs,
        "train_images": len(data.train_y),
        "device": str(data.device),
        "epochs_pruned": int(pruned["epochs"]),
        "epochs_unpruned": int(unpruned["epochs"]),
        "epochs_ratio": round(pruned["epochs"] / unpruned["epochs"], 4),
        "trials_pruned": int(pruned["pruned"]),
        "best_pruned": round(pruned["best"], 4),
        "best_unpruned": round(unpruned["best"], 4),
        "best_diff_points": round(100 * (pruned["best"] - unpruned["best"]), 2),
        "seconds_pruned": round(pruned["seconds"], 1),
        "seconds_unpruned": round(unpruned["seconds"], 1),
    }
    emit(result, args.json)
    return 0
