"""``cifar-hpo bench pruning``: the same small study with the default pruner and with none, live.

    cifar-hpo bench pruning --data ../shared/data/cifar10-jpeg.tar.gz --seeds 3 --json
    cifar-hpo bench pruning --data ../shared/data/cifar10-jpeg.tar.gz --sampler random --seeds 4

Both studies use the study file's (``--study``, default fast_light) model,
search space, pruner (kind, reduction factor, min resource, fidelity) and
sampler seed, and train on the same images as ``bench curves``' banks (a
stratified subset of ``--train-images`` training and ``--val-images``
validation images of the 9:1 split, drawn with the banks' seed), in throwaway
SQLite databases; ``--seeds K`` repeats the pair for sampler seeds
seed..seed+K-1. The unpruned study trains today's recipe (plain fidelity, the
search space's schedule). Reported: epochs trained (cooldown probes included,
as ``bench search`` counts them) and best validation accuracy of each, their
ratio and difference, per seed and as a mean with its spread.

``bench search`` replays the same comparison on recorded curves over many
seeds; this is its live check. With ``--sampler random`` both studies train
the same configurations in the same order (a seeded random sampler does not
look at results), which is what the replay models; with the study's TPE the
pruned study also steers the sampler differently (it sees mostly one-epoch
values), which the replay cannot model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from cifar_hpo.bench import emit
from cifar_hpo.bench.curves import BankImages, bank_data
from cifar_hpo.storage import record
from cifar_hpo.study import scheduling
from cifar_hpo.study.create import open_study
from cifar_hpo.study.pruning import probe_epochs
from cifar_hpo.study.spec import PrunerSpec, StudySpec, load_spec
from cifar_hpo.study.worker import work
from cifar_hpo.training.loop import PROBE_COOLDOWN_FRAC


def run_study(spec: StudySpec, data: object, folder: Path) -> dict[str, Any]:
    """Run ``spec`` to completion in a fresh database; return epochs trained (probes included), best value, the curves."""
    url = f"sqlite:///{folder}/{spec.name}.db"
    started = time.time()
    open_study(spec, url, data.split_hash)  # type: ignore[attr-defined]
    work(spec, url, folder, data, seed=spec.seed, prefix=f"[{spec.name}] ")  # the same draws in both studies
    study = optuna.load_study(study_name=spec.name, storage=url)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    probes = probe_epochs(spec)
    # A probe at epoch k trains PROBE_COOLDOWN_FRAC * k epochs more (training.train's probe_steps).
    extra = sum(PROBE_COOLDOWN_FRAC * k for t in trials for k in probes if k in t.intermediate_values and k < spec.epochs)
    return {
        "epochs": float(sum(len(t.intermediate_values) for t in trials)) + extra,
        "best": float(study.best_value),
        "pruned": float(sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)),
        "seconds": time.time() - started,
        # Each trial's accuracy per epoch, in trial order, and which is the recipe (trained to the end by promotion).
        "curves": [[v for _, v in sorted(t.intermediate_values.items())] for t in sorted(trials, key=lambda t: t.number)],
        "recipe": [i for i, t in enumerate(sorted(trials, key=lambda t: t.number)) if record.read(t).origin == record.RECIPE],
    }


def replay_of(spec: StudySpec, unpruned: dict[str, Any]) -> dict[str, float] | None:
    """What the replay (`scheduling.simulate`, one worker) predicts for ``spec``'s promotion rule on the unpruned study's curves.

    With the random sampler both studies train the same configurations in the same order and
    training is deterministic on a CPU, so the live pruned study must do exactly this. None for
    pruners other than promote (``bench search`` replays those through Optuna).
    """
    rule = scheduling.rule_of(spec)
    if rule is None:
        return None
    out = scheduling.simulate(rule, unpruned["curves"], protected=unpruned["recipe"])
    return {"epochs": out.epochs, "best": out.best}


def main(args: argparse.Namespace) -> int:
    """Run both studies side by side and print the comparison."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_spec(args.study).with_overrides(epochs=args.epochs, trials=args.trials, data=args.data)
    base = base.replace(seed=args.seed)
    if args.sampler:
        base = base.replace(sampler=dataclasses.replace(base.sampler, kind=args.sampler))
    if args.pruner or args.reduction_factor:
        chosen = dataclasses.replace(
            base.pruner, kind=args.pruner or base.pruner.kind, reduction_factor=args.reduction_factor or base.pruner.reduction_factor
        )
        base = base.replace(pruner=chosen)
    images = BankImages(train_images=args.train_images, val_images=args.val_images, source=args.data,
                        data_dir=args.data_dir, cache_dir=args.cache_dir, device=args.device)  # fmt: skip
    data = bank_data(base, images, 0)  # the default banks' images (bench curves --seed 0)
    per_seed = []
    for seed in range(base.seed, base.seed + max(1, args.seeds)):
        pruned_spec = base.replace(name=f"pruned-{seed}", seed=seed)
        today = dataclasses.replace(PrunerSpec(), kind="none", fidelity="plain")  # today's recipe, never pruned
        none_spec = base.replace(name=f"unpruned-{seed}", seed=seed, pruner=today)
        with tempfile.TemporaryDirectory(prefix="cifar-hpo-bench-") as tmp:
            pruned = run_study(pruned_spec, data, Path(tmp))
            unpruned = run_study(none_spec, data, Path(tmp))
        predicted = replay_of(pruned_spec, unpruned)
        replayed = {} if predicted is None else {
            "replay_epochs": predicted["epochs"], "replay_best": round(predicted["best"], 4),
            "replay_agrees": predicted["epochs"] == pruned["epochs"] and abs(predicted["best"] - pruned["best"]) < 1e-9,
        }  # fmt: skip
        per_seed.append({
            "seed": seed,
            "epochs_pruned": round(pruned["epochs"], 2),
            "epochs_unpruned": int(unpruned["epochs"]),
            "epochs_ratio": round(pruned["epochs"] / unpruned["epochs"], 4),
            "trials_pruned": int(pruned["pruned"]),
            "best_pruned": round(pruned["best"], 4),
            "best_unpruned": round(unpruned["best"], 4),
            "regret_points": round(100 * (unpruned["best"] - pruned["best"]), 2),
            "seconds_pruned": round(pruned["seconds"], 1),
            "seconds_unpruned": round(unpruned["seconds"], 1),
            **replayed,
        })  # fmt: skip
        print(f"seed {seed}: " + ", ".join(f"{k} {v}" for k, v in per_seed[-1].items() if k != "seed"), flush=True)

    def spread(key: str) -> float:
        return round(statistics.stdev(r[key] for r in per_seed), 4) if len(per_seed) > 1 else 0.0

    p = base.pruner
    result = {
        "study": base.name,
        "pruner": f"{p.kind} (min_resource={p.min_resource}, reduction_factor={p.reduction_factor}, fidelity={p.fidelity})",
        "sampler": base.sampler.kind,
        "trials": base.trials,
        "epochs_per_trial": base.epochs,
        "train_images": len(data.train_y),
        "val_images": len(data.eval_y),
        "device": str(data.device),
        "seeds": len(per_seed),
        "epochs_ratio": round(statistics.fmean(r["epochs_ratio"] for r in per_seed), 4),
        "epochs_ratio_sd": spread("epochs_ratio"),
        "regret_points": round(statistics.fmean(r["regret_points"] for r in per_seed), 3),
        "regret_points_sd": spread("regret_points"),
        "wall_ratio": round(sum(r["seconds_pruned"] for r in per_seed) / sum(r["seconds_unpruned"] for r in per_seed), 4),
        "regret_points_max": max(r["regret_points"] for r in per_seed),
        **({"replay_agrees": all(r["replay_agrees"] for r in per_seed)} if all("replay_agrees" in r for r in per_seed) else {}),
        "per_seed": per_seed,
    }
    emit({k: v for k, v in result.items() if k != "per_seed"}, False)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
