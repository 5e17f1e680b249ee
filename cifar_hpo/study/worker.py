"""One worker's loop: take trials from the study until it has its finished trials, through database outages.

    work(spec, url, results, data, st=st)     # `cifar-hpo run` (one worker) and each `--workers` process

``--trials N`` means the study ends with N finished (complete + pruned)
trials: after an interruption the same command finishes the remainder.
Failed trials do not count; five failures in a row stop the run with the
last reason. Several workers (processes here, or machines on one database)
never run more than N: the first N lineages to begin (a trial and its retries,
in trial-number order) hold the N slots, and a trial of a later one (a retry
included) fails at once with the reason "surplus" and runs nothing. A killed
trial holds its slot until its retry is added; no study ends with a killed
trial not retried, or with a second retry of one trial left waiting.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_hpo import data, storage
from cifar_hpo.errors import UserError, caused_by, first_line
from cifar_hpo.storage import heartbeat, optuna_compat, record
from cifar_hpo.storage.refused import refusal, refusals_as_one_line
from cifar_hpo.storage.sqlite import sqlite_file
from cifar_hpo.study import budget, scheduling
from cifar_hpo.study.create import make_sampler, sampler_seed
from cifar_hpo.study.objective import (
    Context,
    Interrupted,
    TrialPaused,
    finished_count,
    objective,
    remove_trial_folder,
    stop_paused,
)
from cifar_hpo.study.pruning import make_pruner
from cifar_hpo.study.scheduling import held_slots as _held_slots
from cifar_hpo.study.spec import StudySpec

MAX_FAILS_IN_ROW = 5


POLL_S = 5.0  # how often a worker waiting on others' running trials looks again


class _NoInterruptTraceback(logging.Filter):
    """Drops Optuna's "Trial N failed ... because of ..." traceback (about 25 lines) where the run says it in one line.

    On SIGTERM or Ctrl-C the interrupted trial is re-queued on purpose (see ``objective``); a surplus
    trial stands down on purpose (`SurplusTrial`): the worker's own line says so ("FAILED: surplus: ...").
    """

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        number = message.split(" ", 2)[1] if message.startswith("Trial ") else ""
        if isinstance(exc, KeyboardInterrupt | SurplusTrial):
            self.interrupted.add(number)
            return False
        return not (number in self.interrupted and "failed with value" in message)


_QUIET_INTERRUPTS = _NoInterruptTraceback()


logging.getLogger("optuna.study._optimize").addFilter(_QUIET_INTERRUPTS)


class SurplusTrial(RuntimeError):
    """A trial started after the study already had enough finished or running trials."""


def load_data(spec: StudySpec, *, device: str = "auto", data_dir: Path | None = None, cache_dir: Path | None = None,
              final: bool = False) -> data.DeviceData:  # fmt: skip
    """`data.study_data` of the spec's data on ``device`` (``--device``, ``--data-dir``, ``--cache-dir`` of a command)."""
    d = spec.data
    return data.study_data(
        d.source, subset=d.subset, val_fraction=d.val_fraction, split_seed=d.split_seed,
        device=device, data_dir=data_dir, cache_dir=cache_dir, final=final,
    )  # fmt: skip


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (preemption, ``kill``) interrupts like Ctrl-C, so the trial is marked and re-queued."""

    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return  # a second SIGTERM (a supervisor and the parent both signal) must not abort the save in progress
        fired.append(signum)
        raise Interrupted(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _count_blocking(study: optuna.Study, number: int) -> int:
    """Lineages holding a slot that began below trial ``number`` (`_held_slots`)."""
    return len(_held_slots(study.get_trials(deepcopy=False), below=number))


def _stand_down(trials: Sequence[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial, target: int) -> str | None:
    """Why ``trial`` must run nothing (the detail of its "surplus" reason), or None when it may run.

    The first ``target`` lineages to begin, in trial-number order, run; a trial of a later one is
    surplus, a retry included: a trial killed before it came here is retried, and its retry must
    not run where the trial itself would not have. Of two retries of one trial the first runs.
    """
    if len(_held_slots(trials, below=heartbeat.lineage(trial))) >= target:
        return "the study already had enough finished or running trials"
    if (first := heartbeat.earlier_retry(trials, trial)) is not None:  # two workers re-queued one lost trial
        return f"a second retry of the same trial, #{first} is the retry"
    return None


@dataclass(frozen=True)
class _Progress:
    """Where the study stands, read once per turn of a worker's loop."""

    trials: list[optuna.trial.FrozenTrial]
    finished: int  # complete + pruned trials: what --trials counts
    held: int  # slots held (`_held_slots`): finished, running, waiting or awaiting a retry
    waiting: list[optuna.trial.FrozenTrial]  # trials a worker can take
    awaiting_retry: list[optuna.trial.FrozenTrial]  # failed as stale, retry never added (`heartbeat.awaiting_retry`)


def _progress(study: optuna.Study) -> _Progress:
    trials = study.get_trials(deepcopy=False)
    return _Progress(
        trials=trials,
        finished=sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
        held=len(_held_slots(trials)),
        waiting=[t for t in trials if t.state == TrialState.WAITING],
        awaiting_retry=heartbeat.awaiting_retry(trials),
    )


def _fail_spares(study: optuna.Study, p: _Progress, target: int, log: Callable[[str], None], results: Path) -> bool:
    """Fail as surplus what a study that is done still holds beyond its target: nothing is left RUNNING or WAITING for it.

    A waiting retry (a second retry of one trial, or one of a trial beyond the target), and a running
    trial beyond the target: its worker was killed (or lost the database) before the check that would
    have failed it, and it would stay RUNNING, as no worker runs a study that is done. A running one
    whose worker is alive stands down at that check anyway (the same reason holds for it). A paused
    one (a study run again with fewer ``--trials``) has no worker: its snapshot under ``results`` goes too.

    Returns:
        Whether a waiting retry may still run (it keeps the study from being done).
    """
    st = optuna_compat.study_storage(study)
    pending = False
    for t in p.trials:
        if t.state not in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if t.state == TrialState.WAITING and heartbeat.lineage(t) == t.number:
            continue  # not a retry: enqueued by hand, for a later run
        why = _stand_down(p.trials, t, target)
        if why is None:
            pending = pending or t.state == TrialState.WAITING
            continue
        # A waiting one goes straight to FAIL, never RUNNING: a kill in between leaves nothing to retry.
        try:
            record.write_failure((st, optuna_compat.trial_id(t)), record.FailKind.SURPLUS, why)
            st.set_trial_state_values(optuna_compat.trial_id(t), TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker failed it first
        if record.is_paused(t):
            remove_trial_folder(results, study, heartbeat.lineage(t))
        log(f"trial #{t.number} not run: {why}")
    return pending


def work(spec: StudySpec, url: str, results: Path, data: Any, *, st: optuna.storages.RDBStorage | None = None,
         seed: int | None = None, prefix: str = "", timeout: float | None = None) -> None:
    """One worker's loop: run trials until the study has ``spec.trials`` finished ones.

    ``st``: this process's storage on ``url`` (opened here if None). ``seed``: the sampler's seed
    (default: ``sampler_seed(spec)``, different in every process).
    """
    st = st or storage.open_storage(url)
    seed = sampler_seed(spec) if seed is None else seed
    study = optuna.load_study(study_name=spec.name, storage=st, sampler=make_sampler(spec, seed),
                              pruner=make_pruner(spec))  # fmt: skip

    def log(line: str) -> None:
        print(f"{prefix}{line}", flush=True)

    ran: list[int] = []
    # The outcome of a trial whose training is over, until the database has it (see _until_written).
    outcome: list[tuple[optuna.Trial, TrialState, float | None]] = []

    def keep(write: Callable[[], Any]) -> Any:
        return _until_written(st, ran[-1] if ran else None, study, write, log)

    ctx = Context(spec=spec, data=data, results=results, store=storage.artifact_store(url, results),
                  target_trials=spec.trials, log=log, until_written=keep)  # fmt: skip

    def guarded(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        try:
            record.write_sampler_seed(trial, seed)
            trials = study.get_trials(deepcopy=False)
            if (why := _stand_down(trials, next(t for t in trials if t.number == trial.number), spec.trials)) is not None:
                record.write_failure(trial, record.FailKind.SURPLUS, why)
                raise SurplusTrial(f"surplus trial, nothing run ({why})")
            try:
                value = objective(trial, ctx)
            except optuna.TrialPruned:
                outcome.append((trial, TrialState.PRUNED, None))
                raise
            outcome.append((trial, TrialState.COMPLETE, value))
            return value
        except Exception as e:
            if _lost_database(e):  # not the trial's fault: leave it RUNNING to be retried once, as a killed worker's
                raise DatabaseLost(first_line(e, innermost=True)) from e
            if caused_by(e, optuna.exceptions.UpdateFinishedTrialError):
                raise TrialTakenOver(f"trial #{trial.number} was failed by another worker while it ran (as stale: its retry "
                                     "takes over; or as surplus)") from e  # fmt: skip
            raise

    fails_in_row = 0
    started = time.time()
    rule = scheduling.rule_of(spec)
    while True:
        with storage.quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        p = _progress(study)
        stopping = p.finished >= spec.trials or (p.held >= spec.trials and not p.waiting)  # or waiting on others' slots
        # A killed trial's retry was never added (its worker was killed between the FAIL and the retry):
        # add it now, not after GRACE_PERIOD, so that no study ends with a killed configuration not retried.
        if p.awaiting_retry and stopping and heartbeat.requeue(study, p.awaiting_retry):
            continue
        if p.finished >= spec.trials and not _fail_spares(study, p, spec.trials, log, results):
            break
        if timeout is not None and time.time() - started > timeout:
            log(f"--timeout {timeout:g}s reached; {p.finished}/{spec.trials} trials finished, run again to continue")
            break
        todo = _next(rule, p, spec.trials)
        if spec.budget_s is not None:
            account = budget.account(study, spec.budget_s, spec.epochs, rule)
            if todo.kind != "stop" and not account.affords(_cost(rule, spec, p, todo)):
                log(f"{account.line()}: not enough for {'the next promotion' if todo.kind == 'resume' else 'another trial'}; "
                    f"{p.finished}/{spec.trials} trials finished")  # fmt: skip
                break
        if todo.kind == "stop":
            _stop(study, st, todo, ctx, log)
            continue
        if todo.kind in ("wait", "done"):
            time.sleep(POLL_S)  # others' running trials may complete the study, reach a rung, or fail and free a slot
            continue
        ran.clear()
        outcome.clear()
        try:
            if todo.kind == "resume":
                if not _resume(study, st, todo, guarded, ctx, log):
                    continue  # another worker took it first
            else:
                study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except TrialPaused as e:
            log(str(e))
            fails_in_row = 0
            continue
        except Exception as e:
            if not (outcome and _lost_database(e)):
                raise
            # Training is over and only Optuna's final write failed: keep the result and write it
            # when the database is back, instead of leaving the trial to be retrained from scratch.
            kept = outcome[0]
            _until_written(st, kept[0].number, study, functools.partial(_tell_once, study, *kept), log)
        if not ran:
            continue
        last = next(t for t in study.get_trials(deepcopy=False) if t.number == ran[0])
        log(_trial_line(study, last))
        last_record = record.read(last)
        if last.state == TrialState.FAIL and last_record.fail_kind is not record.FailKind.SURPLUS:  # a surplus trial ran nothing
            fails_in_row += 1
            if fails_in_row >= MAX_FAILS_IN_ROW:
                raise UserError(
                    f"{fails_in_row} trials in a row failed, last (#{last.number}): {last_record.fail_reason}; "
                    f"fix the cause (search space {spec.search_space!r}, data, memory) and run again"
                )
        else:
            fails_in_row = 0


def _next(rule: scheduling.Rule | None, p: _Progress, target: int) -> scheduling.Work:
    """What this worker does next: a new trial (or a waiting one), a promotion, waiting, or stopping the paused trials.

    Without pause and promote: a new or waiting trial while the study has a free slot or a waiting
    retry, else wait for the others' running trials. With it: `scheduling.next_work`, where a waiting
    trial (a killed trial's retry, the enqueued recipe) runs before anything but a promotion.
    """
    if rule is None:
        if p.held < target or p.waiting:
            return scheduling.Work("new")
        # Trials paused under an earlier study file that paused and promoted: they go on under today's pruner.
        paused = [c.key for c in scheduling.ladder(p.trials) if c.status is scheduling.Status.PAUSED]
        return scheduling.Work("resume", paused[0]) if paused else scheduling.Work("wait")
    todo = scheduling.next_work(rule, scheduling.ladder(p.trials), new_left=p.held < target)
    if p.waiting and todo.kind != "resume":
        return scheduling.Work("new")  # Optuna's ask() takes the waiting trial first
    return todo


def _cost(rule: scheduling.Rule | None, spec: StudySpec, p: _Progress, todo: scheduling.Work) -> int:
    """Epochs the next piece of work trains at most: a whole trial, or (pause and promote) up to its next rung."""
    if rule is None:
        return spec.epochs  # a resumed trial trains less; what is left is not known here
    if todo.kind == "resume":
        at = next(c.epoch for c in scheduling.ladder(p.trials) if c.key == todo.key)
        return rule.next_stop(at) - at
    return rule.next_stop(0)


def _paused_trial(study: optuna.Study, key: int | None) -> optuna.trial.FrozenTrial | None:
    """The paused trial of configuration (lineage) ``key``, or None when it is paused no more."""
    return next((t for t in study.get_trials(deepcopy=False) if heartbeat.lineage(t) == key and record.is_paused(t)), None)


def _claim(study: optuna.Study, st: optuna.storages.RDBStorage, key: int | None) -> optuna.Trial | None:
    """Take the paused trial of configuration ``key`` for this worker, or None when another worker took it first.

    Its heartbeat is recorded before the claim: the moment the marker is gone the trial is an
    ordinary running one, so a worker killed right after the claim leaves a trial that goes stale
    and is retried from its snapshot, never one that is lost (`heartbeat.HeartbeatStorage` skips
    paused trials, and reads their markers before their heartbeats).
    """
    frozen = _paused_trial(study, key)
    marker = record.read(frozen).paused if frozen is not None else None
    if frozen is None or marker is None:
        return None
    tid = optuna_compat.trial_id(frozen)
    st.record_heartbeat(tid)
    if not record.claim_paused(st, tid, marker):
        return None
    return optuna.Trial(study, tid)


def _resume(study: optuna.Study, st: optuna.storages.RDBStorage, todo: scheduling.Work, func: Callable[[optuna.Trial], float],
            ctx: Context, log: Callable[[str], None]) -> bool:  # fmt: skip
    """Resume a paused trial that ranks in its rung's top now, as ``study.optimize`` runs a new one.

    Its heartbeat is sent while it trains; the outcome is told as Optuna tells it (COMPLETE with the
    value, PRUNED, or FAIL; Ctrl-C is told FAIL and raised again); exceptions that are not the trial's
    (a pause, a lost database, a refused write) go up with the trial left RUNNING, as from ``optimize``.

    Returns:
        False when another worker claimed it first (nothing ran).
    """
    trial = _claim(study, st, todo.key)
    if trial is None:
        return False
    s = todo.standing
    text = f"promoted at epoch {s.epoch}: {s.words()}" if s is not None else "resumed: the study's pruner no longer pauses trials"
    record.write_schedule(trial, text)
    log(f"trial #{trial.number} {text}")
    value: float | None = None
    error: BaseException | None = None
    ctx.resuming = trial.number  # the objective goes on from the trial's own snapshot and training time
    try:
        with _beating(st, optuna_compat.trial_id(trial)):
            try:
                value, state = func(trial), TrialState.COMPLETE
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (Exception, KeyboardInterrupt) as e:
                state, error = TrialState.FAIL, e
    finally:
        ctx.resuming = None
    ctx.until_written(functools.partial(_tell_once, study, trial, state, value))
    if isinstance(error, KeyboardInterrupt):
        raise error
    return True


@contextlib.contextmanager
def _beating(st: optuna.storages.RDBStorage, trial_id: int) -> Iterator[None]:
    """Send the trial's heartbeat every ``heartbeat_interval`` seconds while the block runs (as Optuna's optimize does)."""
    interval = getattr(st, "heartbeat_interval", None)
    if not interval:
        yield
        return
    import threading  # only workers that resume trials start one

    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            st.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _stop(study: optuna.Study, st: optuna.storages.RDBStorage, todo: scheduling.Work, ctx: Context,
          log: Callable[[str], None]) -> None:  # fmt: skip
    """Every trial has begun and nothing can be promoted any more: stop the paused trials, each with its reason."""
    for key, standing in todo.stop:
        trial = _claim(study, st, key)
        if trial is None:
            continue  # another worker stops (or resumes) it
        text = f"stopped at epoch {standing.epoch}: {standing.words()}; every trial has begun"
        ctx.until_written(functools.partial(stop_paused, trial, ctx, text))
        log(f"trial #{trial.number} {text}")


def _tell_once(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None) -> None:
    """Record a finished trial's outcome unless the database has it already (a write that failed late)."""
    frozen = optuna_compat.study_storage(study).get_trial(optuna_compat.trial_id(trial))
    if frozen.state != TrialState.RUNNING:
        return  # written after all, or failed as stale by another worker (its retry takes over)
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


def _until_written(st: optuna.storages.RDBStorage, number: int | None, study: optuna.Study, write: Callable[[], Any],
                   log: Callable[[str], None]) -> Any:  # fmt: skip
    """Call ``write`` until the database takes it: a finished trial's result is kept, not thrown away.

    While the database is out of reach the trial's heartbeat is sent again with every try, so that
    once it is back the trial is not failed as stale by another worker before its result is written.

    Raises:
        UserError: the database stayed away for ``RECONNECT_S`` seconds.
    """
    deadline: float | None = None
    while True:
        try:
            return write()
        except Exception as e:
            if not _lost_database(e):
                raise
            what = "a trial's result" if number is None else f"trial #{number}'s result"
            if deadline is None:
                deadline = time.time() + RECONNECT_S
                log(f"lost the database {storage.mask_url(str(st.engine.url))} ({first_line(e, innermost=True)}) while writing {what}; "
                    f"keeping it and trying again for up to {RECONNECT_S:g}s")  # fmt: skip
            elif time.time() > deadline:
                raise UserError(f"the database stayed unreachable for {RECONNECT_S:g}s, so {what} could not be written "
                                f"({first_line(e, innermost=True)}); run the same command again when it is back") from None  # fmt: skip
        time.sleep(RETRY_WRITE_S)
        st.engine.dispose()  # pooled connections may be dead (server restart) or broken (I/O error)
        if number is not None:
            with contextlib.suppress(Exception):
                tid = optuna_compat.study_storage(study).get_trial_id_from_study_id_trial_number(optuna_compat.study_id(study), number)
                st.record_heartbeat(tid)


def _trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial) -> str:
    done = finished_count(study)
    try:
        best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    rec = record.read(t)
    if t.state == TrialState.COMPLETE:
        what = f"complete, val_acc {t.value:.4f}"
    elif t.state == TrialState.PRUNED:
        what = f"pruned after {'?' if rec.epochs_run is None else rec.epochs_run} epochs"
    else:
        what = f"FAILED: {rec.fail_note(missing='see log')}"
    return f"trial #{t.number} {what}; {done} finished, {best}"


class DatabaseLost(BaseException):
    """The database went away during a trial.

    A BaseException, so that Optuna does not record the trial FAIL (it would, with no retry, if the
    database came back in time): the trial stays RUNNING, its heartbeat stops, and it is failed and
    re-queued exactly once by whichever worker sees it stale, like the trial of a killed worker.
    """


class TrialTakenOver(BaseException):
    """Another worker failed this worker's trial: as stale (its heartbeats were late) and re-queued it, or as surplus.

    A BaseException, so that Optuna does not try to record the finished trial again; the worker
    drops the trial and goes on with the next one.
    """


RETRY_WRITE_S = float(os.environ.get("CIFAR_HPO_RETRY_WRITE_S", "2"))  # pause between tries of a kept result


MAX_RECONNECTS = 20  # database outages survived by one run (each up to RECONNECT_S)


RECONNECT_S = float(os.environ.get("CIFAR_HPO_RECONNECT_S", "600"))  # seconds to wait for a lost database to return


def _lost_database(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a lost or refused database connection.

    Not a write the disk refused (SQLite's "database or disk is full", a read-only file), which
    waiting does not cure: `reconnecting` stops the run with its one line instead.
    """
    return storage.lost_connection(e) and refusal(e) is None


def reconnecting(url: str, log: Callable[[str], None], loop: Callable[[], None],
                  st: optuna.storages.RDBStorage | None = None) -> None:  # fmt: skip
    """Run a worker ``loop``; when the database goes away (server restart, network), wait for it and run it again.

    The trial that was running is abandoned: its heartbeat stops, so it is failed and retried from its
    last snapshot once stale, like the trial of a killed worker. Finished trials are in the database
    already and are never touched. A trial taken over by another worker (``TrialTakenOver``) is
    dropped and the loop goes on.

    Raises:
        UserError: the database stayed away for ``RECONNECT_S`` seconds, or was lost ``MAX_RECONNECTS`` times.
    """
    import threading

    import sqlalchemy.exc

    previous_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        # A thread that dies with the connection: one line instead of a page of traceback.
        if args.exc_value is not None and _lost_database(args.exc_value):
            log(f"heartbeat stopped: {first_line(args.exc_value, innermost=True)}")
        else:
            previous_hook(args)

    threading.excepthook = hook
    shown = storage.mask_url(url)
    lost = 0
    try:
        while True:
            try:
                with refusals_as_one_line(sqlite_file(url)):  # a full or read-only disk: the user must act
                    loop()
                return
            except TrialTakenOver as e:
                log(str(e))
                continue
            except (Exception, DatabaseLost) as e:
                if not _lost_database(e):
                    raise
                lost += 1
                if lost > MAX_RECONNECTS:
                    raise UserError(f"lost the database {shown} {lost} times in this run; check the server and run again") from None
                log(f"lost the database {shown} ({first_line(e, innermost=True)}); waiting up to {RECONNECT_S:g}s for it to come back; "
                    "the running trial is retried from its last snapshot")  # fmt: skip
            deadline = time.time() + RECONNECT_S
            while True:
                try:
                    if st is None:
                        storage.open_storage(url, heartbeat=False).engine.dispose()
                    else:
                        storage.ping(st)  # this process's storage: no second open of the same database
                    break
                except (UserError, sqlalchemy.exc.DBAPIError) as e:
                    if time.time() > deadline:
                        raise UserError(f"the database stayed unreachable for {RECONNECT_S:g}s ({first_line(e, innermost=True)}); "
                                        "run the same command again when it is back: finished trials are kept") from None  # fmt: skip
                    time.sleep(2.0)
            log(f"reconnected to {shown}")
    finally:
        threading.excepthook = previous_hook
