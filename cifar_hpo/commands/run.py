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
from cifar_hpo.storage import record
from cifar_hpo.storage.checkpoint import remove_stale_tmp
from cifar_hpo.storage.refused import refusals_as_one_line
from cifar_hpo.storage.sqlite import sqlite_file
from cifar_hpo.study import budget, scheduling
from cifar_hpo.study import note as dashboard_notes
from cifar_hpo.study.create import open_study, refuse_foreign
from cifar_hpo.study.objective import finished_count, study_folder
from cifar_hpo.study.spec import StudySpec, load_spec, save_resolved
from cifar_hpo.study.supervisor import check_workers, run_workers
from cifar_hpo.study.worker import load_data, reconnecting, sigterm_as_interrupt, work


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo run``."""
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}: it is the number of finished trials the study ends with")
    check_workers(args.workers, args.device)  # before any worker process starts
    if args.timeout is not None and not args.timeout > 0:  # `not >`: NaN too
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}: it stops starting new trials after that long")
    spec = load_spec(args.study).with_overrides(epochs=args.epochs, trials=args.trials, data=args.data, subset=args.subset,
                                                budget=args.budget, params=args.set)  # fmt: skip
    results: Path = args.results
    url = storage.storage_url(args.storage, results)
    # Opened once, failing fast on a bad URL before decoding data; every later step uses this one. A
    # new SQLite file is only created once the data loaded: a run that fails on its data leaves none.
    fresh = storage.missing_sqlite(url)
    if fresh is None:
        refuse_foreign(spec, url)  # reading only: opening to write already sets the journal mode
        st = storage.open_storage(url)
    else:
        # Folders are made only for the default place under --results; a --storage path names an existing one.
        storage.check_creatable(fresh, make_folders=fresh == results / storage.DB_NAME)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_data(spec, device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if fresh is not None:
        st = storage.open_storage(url)
    with refusals_as_one_line(sqlite_file(url)):  # a full or read-only disk: one line, the study as it was
        study = open_study(spec, url, data.split_hash, st)
        dashboard_notes.describe_study(study, spec, data.split_hash, (len(data.train_y), len(data.eval_y)))
        _remove_stale_tmp(results, study, url)
        save_resolved(spec, results / spec.name)
        if spec.budget_s is not None:  # for `status` and the dashboard; the account itself is the trials
            study.set_user_attr(budget.BUDGET_ATTR, spec.budget_s)
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
    if spec.budget_s is not None:
        rule = scheduling.rule_of(spec)
        account = budget.account(study, spec.budget_s, spec.epochs, rule)
        print(account.line(), flush=True)
        if not account.affords(spec.epochs if rule is None else rule.next_stop(0)):
            print("nothing to do: the budget left cannot pay for another trial (ask for more with --budget)")
            return 0
    if args.workers == 1:
        with sigterm_as_interrupt():
            reconnecting(url, print, lambda: work(spec, url, results, data, st=st, timeout=args.timeout), st=st)
    else:
        del data  # each worker process loads its own copy onto its own device
        code = run_workers(spec, url, results, workers=args.workers, device=args.device, data_dir=args.data_dir,
                           cache_dir=args.cache_dir, timeout=args.timeout)  # fmt: skip
        if code:
            _summary(study, spec)
            return code
    _summary(study, spec)
    return 0


def _remove_stale_tmp(results: Path, study: optuna.Study, url: str) -> None:
    """Delete the temp files of writers killed mid-write (`remove_stale_tmp`) where this study writes.

    Its own folder (`study_folder`), the top of ``results/<study>/`` (spec.json), the previous
    version's trial folders and the artifact store; never the folder of another study of the same
    name (another database), whose writer may be alive on another machine sharing the folder.
    """
    named = results / study.study_name
    remove_stale_tmp(named, recursive=False)
    for folder in (study_folder(results, study), named / "trials", storage.artifact_dir(url, results)):
        remove_stale_tmp(folder)


def _summary(study: optuna.Study, spec: StudySpec) -> None:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    try:
        best = f"best val_acc {study.best_value:.4f} (trial #{study.best_trial.number})"
    except ValueError:
        best = "no complete trial"
    recipe = next((t for t in study.get_trials(deepcopy=False) if record.read(t).origin == record.RECIPE and t.value is not None
                   and t.state == TrialState.COMPLETE), None)  # fmt: skip
    if recipe is not None:
        best += f"; the model's recipe (trial #{recipe.number}): {recipe.value:.4f}"
    paused = sum(record.is_paused(t) for t in study.get_trials(deepcopy=False))
    left = f", {paused} paused (run again to go on)" if paused else ""
    print(f"study {study.study_name!r}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed{left}; {best}")
    if spec.budget_s is not None:
        print(f"study {study.study_name!r}: {budget.account(study, spec.budget_s, spec.epochs).line()}")
