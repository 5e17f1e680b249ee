"""Heartbeats and retries: a trial whose worker died is failed as stale and re-queued exactly once."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from optuna.trial import TrialState

from cifar_hpo.storage import optuna_compat, record
from cifar_hpo.storage.connection import lost_connection, quiet_experimental

# Seconds between heartbeats, and silence after which a RUNNING trial is stale.
HEARTBEAT_INTERVAL = int(os.environ.get("CIFAR_HPO_HEARTBEAT", "20"))


GRACE_PERIOD = int(os.environ.get("CIFAR_HPO_GRACE", str(3 * HEARTBEAT_INTERVAL)))


MAX_RETRY = 2  # a trial killed more often than this stays FAIL


# Seconds after which a RUNNING trial that never got a single heartbeat is failed as stale: its worker
# died between taking it and its first heartbeat. Long, because trial start times come from the
# workers' clocks, which may disagree between machines (heartbeats use the database server's).
ORPHAN_S = float(os.environ.get("CIFAR_HPO_ORPHAN_S", str(max(600, 10 * GRACE_PERIOD))))


# How long the worker that failed a stale trial keeps trying to add its retry through a database
# outage (the same limit as a worker waiting for a lost database), and the pause between tries.
REQUEUE_S = float(os.environ.get("CIFAR_HPO_RECONNECT_S", "600"))


REQUEUE_PAUSE_S = 2.0


def retry_callback(max_retry: int | None = MAX_RETRY) -> Any:
    with quiet_experimental():
        return optuna_compat.retry_callback_class()(max_retry=max_retry, inherit_intermediate_values=True)


def retried_trial_number(trial: optuna.Trial) -> int | None:
    """Number of the original trial that ``trial`` retries (after a kill or an interrupt), or None."""
    # The retry callback records the lineage's first trial under this system attribute.
    value = trial.storage.get_trial_system_attrs(optuna_compat.trial_id(trial)).get("failed_trial")
    return None if value is None else int(value)


def lineage(trial: optuna.trial.FrozenTrial) -> int:
    """Number of the first trial of ``trial``'s lineage: its own, or that of the killed or interrupted trial it retries."""
    first = trial.system_attrs.get("failed_trial")  # written by the retry callback, kept by every later retry
    return trial.number if first is None else int(first)


def _retries(trial: optuna.trial.FrozenTrial) -> list[int]:
    """The trials ``trial`` retries, first to last (empty for a trial that is no retry)."""
    return list(trial.system_attrs.get("retry_history") or [])


def earlier_retry(trials: Sequence[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> int | None:
    """Number of the retry (in ``trials``) that runs instead of ``trial``, a second retry of the same trial; or None.

    Two workers may re-queue one lost trial: the retry numbered first runs. A second retry that was
    itself killed (or cut off) before it stood down is retried in turn; that retry is a second one too.
    """
    history = _retries(trial)
    if not history:
        return None
    for t in trials:
        if t.number < trial.number and _retries(t)[-1:] == history[-1:]:
            return t.number
    parent = next((t for t in trials if t.number == history[-1]), None)
    return None if parent is None else earlier_retry(trials, parent)


def awaiting_retry(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials failed as stale, with a retry left (``MAX_RETRY``), that no trial of ``trials`` retries yet.

    Failing a stale trial and adding its retry are two writes. Between them (milliseconds; longer
    through a database outage) the trial awaits its retry, and for ever if the worker that wrote the
    FAIL was killed in between: such a trial still holds its place in the study, like a RUNNING one.
    """
    retried = {_retries(t)[-1] for t in trials if _retries(t)}
    return [t for t in trials
            if t.state == TrialState.FAIL and t.number not in retried and record.read(t).fail_kind is record.FailKind.STALE
            and len(_retries(t)) + 1 <= MAX_RETRY]  # fmt: skip


def requeue(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> bool:
    """Add the retry of each of ``trials`` (failed as stale) now, as the worker that failed it would have.

    Returns:
        False when the study's storage retries nothing (opened without heartbeats).
    """
    callback = optuna_compat.stale_trial_callback(optuna_compat.study_storage(study))
    if callback is None:
        return False
    for t in trials:
        callback(study, copy.deepcopy(t))  # the callback appends to the trial's retry history in place
    return True


def requeue_interrupted(study: optuna.Study, trial_number: int) -> None:
    """Re-queue an interrupted trial (same params, its intermediate values), as Optuna does for a stale one.

    The interrupted trial itself is always re-queued; but it joins the retry history, so a
    lineage interrupted twice and then killed once has used up ``MAX_RETRY`` and is not retried again.
    """
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial_number)
    with quiet_experimental():
        retry_callback(max_retry=None)(study, frozen)


class HeartbeatStorage(optuna.storages.RDBStorage):
    """RDBStorage whose trials have a heartbeat from the moment they are RUNNING, and keep it.

    Optuna records a trial's first heartbeat only when its heartbeat thread starts, after the
    sampler has run, and never counts a RUNNING trial without one as stale. A worker killed in
    between (measured: 2 of 25 random kills) left a trial RUNNING for ever, and the study waited on
    it for ever. Here the first heartbeat follows the trial's creation (or its hand-out, for a
    re-queued one) at once, so the trial is failed and retried like any other; a trial that still
    got none (the database was down at that moment) is failed after ``ORPHAN_S``. And a database
    restart no longer kills the heartbeat thread of a trial that goes on training.
    """

    # The two private hooks of optuna_compat (CREATE_TRIAL_HOOK, STALE_TRIALS_HOOK); tests/test_optuna_compat.py
    # fails loudly when Optuna stops calling them.
    def _create_new_trial(self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None) -> optuna.trial.FrozenTrial:
        # The private method: Optuna's cache layer (used by every Study) calls it, not create_new_trial.
        frozen = super()._create_new_trial(study_id, template_trial)
        if self.heartbeat_interval is not None and frozen.state == TrialState.RUNNING:
            self.record_heartbeat(optuna_compat.trial_id(frozen))
        return frozen

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # A paused trial (pause and promote) is RUNNING without a heartbeat by design: never stale. Its
        # marker is read before the heartbeats: a worker that resumes it beats first and then removes
        # the marker, so a trial read as not paused here has its new heartbeat below.
        running_trials = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        paused = {optuna_compat.trial_id(t) for t in running_trials if record.is_paused(t)}
        stale = [tid for tid in super()._get_stale_trial_ids(study_id) if tid not in paused]
        # Optuna skips RUNNING trials without any heartbeat; they would block the study for ever.
        cutoff = datetime.now(UTC) - timedelta(seconds=ORPHAN_S)
        running = {optuna_compat.trial_id(t): t.datetime_start for t in running_trials if optuna_compat.trial_id(t) not in paused}
        beating = _with_heartbeat(self.engine, [tid for tid in running if tid not in stale])
        # datetime_start: naive local time up to Optuna 4.x, aware UTC from 5.0; astimezone reads both.
        orphans = [tid for tid, start in running.items()
                   if tid not in stale and tid not in beating and start is not None and start.astimezone(UTC) < cutoff]  # fmt: skip
        marked = []
        for tid in stale + orphans:
            # Said before Optuna fails it (a finished trial's attributes cannot change), so that the FAIL
            # has a reason in `status` and the dashboard instead of an empty one.
            why = (f"no heartbeat for {GRACE_PERIOD}s (its worker was killed, or lost the database); retried"
                   if tid in stale else f"no heartbeat at all in {ORPHAN_S:g}s since it started; retried")  # fmt: skip
            try:
                record.write_failure((self, tid), record.FailKind.STALE, why)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # finished meanwhile: not stale after all
            marked.append(tid)
        for tid in marked:
            self._fail_and_requeue(study_id, tid)
        self._requeue_unretried(study_id, datetime.now(UTC) - timedelta(seconds=GRACE_PERIOD))
        # Optuna's fail_stale_trials would fail them all first and re-queue them afterwards, reading each
        # one again in between: a database outage after the FAILs lost every retry not yet written.
        return []

    def _requeue_unretried(self, study_id: int, cutoff: datetime) -> None:
        """Re-queue trials failed as stale at least ``GRACE_PERIOD`` ago that still have no retry.

        The worker that failed one was killed before it could add the retry (a few milliseconds, but
        ``bench faults`` kills workers right when they fail their killed peers' trials: seen under
        load). Two workers may both do it, or one whose clock is ahead may do it while the owner is
        still writing: the later retry then stands down when taken (``earlier_retry``), so an early
        re-queue costs nothing but a surplus row.
        """
        due = [t for t in awaiting_retry(self.get_all_trials(study_id, deepcopy=False))
               if t.datetime_complete is not None and t.datetime_complete.astimezone(UTC) < cutoff]  # fmt: skip
        if due:
            requeue(optuna.load_study(study_name=self.get_study_name_from_id(study_id), storage=self), due)

    def _fail_and_requeue(self, study_id: int, trial_id: int) -> None:
        """Fail stale trial ``trial_id`` and, if this process failed it, re-queue it at once.

        Marking FAIL and adding the retry are two writes. Failing first makes exactly one worker
        the owner of the retry (the FAIL is the claim); a database outage between the two no longer
        loses the trial, because the owner keeps trying to add the retry until the database is back
        (``REQUEUE_S``), checking first whether an earlier try was written after all.
        """
        try:
            if not self.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another process failed it (and re-queues it), or it finished meanwhile
        callback = optuna_compat.stale_trial_callback(self)
        if callback is None:
            return
        deadline: float | None = None
        while True:
            try:
                failed = self.get_trial(trial_id)
                if deadline is None or not _has_retry(self, study_id, failed.number):
                    study = optuna.load_study(study_name=self.get_study_name_from_id(study_id), storage=self)
                    callback(study, failed)
                return
            except Exception as e:
                if not lost_connection(e):
                    raise
                if deadline is None:
                    deadline = time.time() + REQUEUE_S
                elif time.time() > deadline:
                    raise
            time.sleep(REQUEUE_PAUSE_S)
            self.engine.dispose()  # pooled connections are dead after a server restart

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError):
            # The database is restarting or out of reach. Optuna's heartbeat thread would die here and
            # the trial, still training, would be failed as stale later; keep beating when it is back.
            pass

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        taken = super().set_trial_state_values(trial_id, state, values)
        if taken and state == TrialState.RUNNING and self.heartbeat_interval is not None:
            self.record_heartbeat(trial_id)
        return taken


def _has_retry(st: optuna.storages.RDBStorage, study_id: int, number: int) -> bool:
    """Whether the study holds a retry of trial ``number`` (a trial whose retry history ends with it)."""
    return any(_retries(t)[-1:] == [number] for t in st.get_all_trials(study_id, deepcopy=False))


def _with_heartbeat(engine: sqlalchemy.engine.Engine, trial_ids: list[int]) -> set[int]:
    """Those of ``trial_ids`` that ever sent a heartbeat (a row in Optuna's heartbeat table)."""
    if not trial_ids:
        return set()
    query = sqlalchemy.text(f"SELECT trial_id FROM {optuna_compat.HEARTBEAT_TABLE} WHERE trial_id IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True)
    )
    with engine.connect() as con:
        return {int(row[0]) for row in con.execute(query, {"ids": trial_ids})}
