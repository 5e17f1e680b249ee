"""``cifar-hpo run``: create or resume a study until it has N finished trials.

    cifar-hpo run --study densenet --trials 50
    cifar-hpo run --study fast --trials 20 --workers 2 --data ../shared/data/cifar10-jpeg.tar.gz
    cifar-hpo run --study fast --storage postgresql://me@db-host/hpo     # on every machine

What ``--trials N`` counts, surplus trials and failures in a row: `cifar_hpo.study.worker`;
``--workers``: `cifar_hpo.study.supervisor`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.errors import UserError
from cifar_hpo.storage.checkpoint import remove_stale_tmp
from cifar_hpo.study import note as dashboard_notes
from cifar_hpo.study.create import open_study
from cifar_hpo.study.objective import finished_count
from cifar_hpo.study.spec import load_spec, save_resolved
from cifar_hpo.study.supervisor import run_workers
from cifar_hpo.study.worker import load_data, reconnecting, sigterm_as_interrupt, work


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo run``."""
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}: it is the number of finished trials the study ends with")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    spec = load_spec(args.study).with_overrides(epochs=args.epochs, trials=args.trials, data=args.data, subset=args.subset)
    results: Path = args.results
    url = storage.storage_url(args.storage, results)
    # Opened once, failing fast on a bad URL before decoding data; every later step uses this one. A
    # new SQLite file is only created once the data loaded: a run that fails on its data leaves none.
    fresh = storage.missing_sqlite(url)
    if fresh is None:
        st = storage.open_storage(url)
    else:
        storage.check_creatable(fresh)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_data(spec, device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if fresh is not None:
        st = storage.open_storage(url)
    study = open_study(spec, url, data.split_hash, st)
    dashboard_notes.describe_study(study, spec, data.split_hash, (len(data.train_y), len(data.eval_y)))
    for folder in (results / spec.name, storage.artifact_dir(url, results)):
        remove_stale_tmp(folder)  # left by a writer that was killed mid-write
    save_resolved(spec, results / spec.name)
    done = finished_count(study)
    print(
        f"study {spec.name!r} ({spec.model}, {spec.epochs} epochs/trial) in {storage.mask_url(url)}: "
        f"{done}/{spec.trials} finished; split {data.split_hash}, {len(data.train_y)} train / {len(data.eval_y)} val images, "
        f"device {data.device}",
        flush=True,
    )
    if done >= spec.trials:
        print(f"nothing to do: the study already has {done} finished trials (ask for more with --trials)")
        return 0
    if args.workers == 1:
        with sigterm_as_interrupt():
            reconnecting(url, print, lambda: work(spec, url, results, data, st=st, timeout=args.timeout), st=st)
    else:
        del data  # each worker process loads its own copy onto its own device
        code = run_workers(spec, url, results, workers=args.workers, device=args.device, data_dir=args.data_dir,
                           cache_dir=args.cache_dir, timeout=args.timeout)  # fmt: skip
        if code:
            _summary(study)
            return code
    _summary(study)
    return 0


def _summary(study: optuna.Study) -> None:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    try:
        best = f"best val_acc {study.best_value:.4f} (trial #{study.best_trial.number})"
    except ValueError:
        best = "no complete trial"
    print(f"study {study.study_name!r}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed; {best}")
