"""``cifar-hpo status``: watch studies while they run.

    cifar-hpo status                      # one line per study
    cifar-hpo status --study fast         # one line per trial

It only reads the database (read-only connections, no heartbeat: `storage.open_existing`), so it
is safe to run beside a study in progress and on databases other tools made (so is ``cifar-hpo
dashboard``, `cifar_hpo.commands.dashboard`). Storage URLs are shown with the password masked.
"""

from __future__ import annotations

import argparse
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.errors import UserError
from cifar_hpo.storage import record
from cifar_hpo.study import budget


def study_rows(st: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One plain dict per study: name, model, trial counts by state, best value."""
    rows = []
    for s in optuna.get_all_study_summaries(st, include_best_trial=True):
        trials = optuna.load_study(study_name=s.study_name, storage=st).get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        counts["paused"] = sum(record.is_paused(t) for t in trials)  # pause and promote: RUNNING in Optuna's tables
        counts["running"] -= counts["paused"]
        rows.append(
            {
                "study": s.study_name,
                "model": s.user_attrs.get("model", "?"),
                **counts,
                "best": s.best_trial.value if s.best_trial else None,
                "best_trial": s.best_trial.number if s.best_trial else None,
            }
        )
    return rows


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain dict per trial: number, state (paused too), value, epochs, device seconds, params, and a note.

    The note: why it failed, what the scheduler last did with it (paused, promoted, stopped: its rank
    at the rung), and whether it is the study's recipe (its first configuration).
    """
    rows = []
    for t in study.get_trials(deepcopy=False):
        rec = record.read(t)
        reason = rec.fail_note(missing="")  # None: a retry cleared its original's reason (shown as "-")
        extra = [n for n in ("the model's recipe" if rec.origin == record.RECIPE else None, rec.schedule) if n]
        rows.append(
            {
                "trial": t.number,
                "state": "paused" if record.is_paused(t) else t.state.name.lower(),
                "value": t.value,
                "epochs": len(t.intermediate_values),
                "seconds": record.device_seconds(t) if t.datetime_start else None,
                "params": t.params,
                "note": "; ".join([n for n in (reason, *extra) if n]) if extra else reason,
            }
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo status``."""
    url = storage.storage_url(args.storage, args.results)
    st = storage.open_existing(url)
    if st is None:
        where = storage.missing_sqlite(url) or storage.mask_url(url)
        print(f"no study database at {where} yet; start one with: cifar-hpo run --study NAME")
        return 0
    print(f"storage: {storage.mask_url(url)}")
    if args.study is None:
        rows = study_rows(st)
        if not rows:
            print("no studies yet; start one with: cifar-hpo run --study NAME")
            return 0
        print(_table(rows, ["study", "model", "complete", "pruned", "fail", "running", "paused", "waiting", "best", "best_trial"]))
        for s in optuna.get_all_study_summaries(st, include_best_trial=False):
            if budget.BUDGET_ATTR in s.user_attrs and (line := budget_line(optuna.load_study(study_name=s.study_name, storage=st))):
                print(f"{s.study_name}: {line}")
        return 0
    try:
        study = optuna.load_study(study_name=args.study, storage=st)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)) or "none"
        raise UserError(f"no study {args.study!r} in {storage.mask_url(url)}; studies there: {names}") from None
    if len(study.directions) > 1:  # another tool's: a trial has no single value to show
        raise UserError(
            f"study {args.study!r} in {storage.mask_url(url)} has {len(study.directions)} objectives, and status shows "
            f"single-objective studies (ours: val_acc); look at it with cifar-hpo dashboard or optuna trials --study-name {args.study}"
        )
    rows = trial_rows(study)
    for r in rows:
        r["params"] = _params_text(r["params"])
    print(_table(rows, ["trial", "state", "value", "epochs", "seconds", "params", "note"]))
    if (line := budget_line(study)) is not None:
        print(line)
    return 0


def budget_line(study: optuna.Study) -> str | None:
    """The study's budget, spent and left (`budget.account`), when a run gave it one."""
    budget_s = budget.study_budget(study)
    spec = study.user_attrs.get("spec")
    epochs = spec.get("epochs") if isinstance(spec, dict) else None
    if budget_s is None or not isinstance(epochs, int):
        return None
    return budget.account(study, budget_s, epochs).line()
