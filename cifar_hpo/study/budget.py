"""A study's compute budget: device-seconds summed over every trial on every worker and machine, read from the database.

    cifar-hpo run --study fast_light --budget 2h            # or budget = "2h" in the study file
    cifar-hpo run --study fast_light --budget 90m --trials 50   # whichever ends first

The account is the study's own trials (`record.device_seconds`: each trial's recorded training
time, or its running time so far), so a resumed study, or a second machine joining it, continues
the same account; nothing else is stored but the budget itself (the study attribute
``budget_s``, for `status` and the dashboard note). A worker starts (or resumes) a trial only when
the budget left, after what the trials running elsewhere are still expected to use, can pay for a
whole trial at the study's own measured seconds per epoch. Before any trial has finished there is
no measurement, and the first trials start while anything is left. So a study ends within about
one trial's length of its budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_hpo.errors import UserError
from cifar_hpo.storage import record

BUDGET_ATTR = "budget_s"  # study user attribute: the budget in device-seconds, as the last run set it
_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*")
MAX_BUDGET_S = 366 * 86400.0  # a year of device time: anything longer is a typo


def parse_duration(text: str, where: str = "--budget") -> float:
    """Seconds of ``90m``, ``2h``, ``1.5h``, ``45s``, ``1d`` (a number and a unit).

    Raises:
        UserError: not a positive duration with a unit, or longer than a year.
    """
    m = _DURATION.fullmatch(text)
    if m is None:
        raise UserError(f"{where} {text!r} is not a duration; write a number and a unit, e.g. 90m, 2h, 1.5h, 45s or 1d")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < seconds <= MAX_BUDGET_S:
        raise UserError(f"{where} {text!r} must be more than 0 and at most a year of device time")
    return seconds


def duration_text(seconds: float) -> str:
    """``1h05m``, ``6m12s``, ``42s``: a duration for a person."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass(frozen=True)
class Account:
    """Where a study's budget stands, from its trials."""

    budget_s: float
    spent_s: float  # device time of every trial that ran or runs
    committed_s: float  # what the running trials are still expected to use
    per_epoch_s: float | None  # measured seconds per trained epoch (None before any trial recorded one)

    @property
    def left_s(self) -> float:
        """Budget not yet spent (never negative)."""
        return max(0.0, self.budget_s - self.spent_s)

    def affords(self, epochs: int) -> bool:
        """Whether a trial of ``epochs`` epochs fits in what is left after the running trials' expected use."""
        free = self.budget_s - self.spent_s - self.committed_s
        if free <= 0:
            return False
        return self.per_epoch_s is None or self.per_epoch_s * epochs <= free

    def line(self) -> str:
        """One line for a person: what was spent and what is left."""
        spent, left = duration_text(self.spent_s), duration_text(self.left_s)
        return f"budget {duration_text(self.budget_s)}: spent {spent} of device time, {left} left"


def per_epoch_seconds(trials: list[optuna.trial.FrozenTrial]) -> float | None:
    """Device seconds per trained epoch, over the trials that recorded their time (a resumed retry: its own epochs)."""
    seconds, epochs = 0.0, 0
    for t in trials:
        rec = record.read(t)
        if rec.wall_s is None or not rec.epochs_run:
            continue
        trained = rec.epochs_run - (rec.resumed_from_epoch or 0)
        if trained > 0:
            seconds, epochs = seconds + rec.wall_s, epochs + trained
    return seconds / epochs if epochs else None


def account(study: optuna.Study, budget_s: float, epochs: int, rule: Any = None) -> Account:
    """The study's account against ``budget_s`` for trials of ``epochs`` epochs.

    ``rule``: the study's pause-and-promote rule (`scheduling.Rule`), if it has one: a paused trial
    is then expected to use nothing more, and a running one only up to its next rung (where it may
    pause); without one, a running trial is expected to train all its epochs.
    """
    trials = study.get_trials(deepcopy=False)
    per_epoch = per_epoch_seconds(trials)
    spent = sum(record.device_seconds(t) for t in trials)
    committed = 0.0
    if per_epoch is not None:
        for t in trials:
            if t.state != TrialState.RUNNING or record.is_paused(t):
                continue
            if rule is None:
                committed += max(0.0, per_epoch * epochs - record.device_seconds(t))
            else:
                at = max(t.intermediate_values, default=0)
                stop = epochs if record.read(t).origin == record.RECIPE else rule.next_stop(at)
                committed += per_epoch * max(0, stop - at)
    return Account(budget_s=budget_s, spent_s=spent, committed_s=committed, per_epoch_s=per_epoch)


def study_budget(study: optuna.Study) -> float | None:
    """The budget the study's last run set (device-seconds), or None."""
    value = study.user_attrs.get(BUDGET_ATTR)
    return float(value) if isinstance(value, int | float) and value > 0 else None
