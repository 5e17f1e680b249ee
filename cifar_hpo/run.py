"""``cifar-hpo run``: create or resume a study until it has N finished trials.

    cifar-hpo run --study densenet --trials 50
    cifar-hpo run --study fast --trials 20 --workers 2 --data ../shared/data/cifar10-jpeg.tar.gz
    cifar-hpo run --study fast --storage postgresql://me@db-host/hpo     # on every machine

``--trials N`` means the study ends with N finished (complete + pruned)
trials: after an interruption the same command finishes the remainder.
Failed trials do not count; five failures in a row stop the run with the
last reason. Several workers (processes here, or machines on one database)
never run more than N: a trial started beyond the count fails at once with
the reason "surplus" and runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_hpo import dashboard_notes, optuna_compat, storage
from cifar_hpo.checkpoint import remove_stale_tmp
from cifar_hpo.errors import UserError, caused_by, first_line
from cifar_hpo.objective import Context, Interrupted, finished_count, objective
from cifar_hpo.spec import StudySpec, load_spec, save_resolved

MAX_FAILS_IN_ROW = 5
POLL_S = 5.0  # how often a worker waiting on others' running trials looks again


class _NoInterruptTraceback(logging.Filter):
    """Drops Optuna's "Trial N failed ... because of Interrupted" traceback (about 25 lines) on SIGTERM or Ctrl-C.

    The interrupted trial is re-queued on purpose (see ``objective``) and the run says so in one line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        number = message.split(" ", 2)[1] if message.startswith("Trial ") else ""
        if isinstance(exc, KeyboardInterrupt):
            self.interrupted.add(number)
            return False
        return not (number in self.interrupted and "failed with value" in message)


_QUIET_INTERRUPTS = _NoInterruptTraceback()
logging.getLogger("optuna.study._optimize").addFilter(_QUIET_INTERRUPTS)


class SurplusTrial(RuntimeError):
    """A trial started after the study already had enough finished or running trials."""


def sampler_seed(spec: StudySpec) -> int:
    """This process's sampler seed: the study's ``seed`` mixed with a nonce of this process.

    Processes that start together (``--workers``, machines on one database) must not draw the same
    parameters, and they cannot agree on offsets without coordination: an offset counted from the
    trials so far was the same in every process started at once (2 of 4 trials were duplicates).
    The seed actually used is recorded in each trial's ``sampler_seed`` user attribute. What stays
    reproducible from the study's ``seed`` is each trial's training (see ``objective``).
    """
    nonce = int.from_bytes(os.urandom(8), "little")
    return (spec.seed * 1_000_003 + nonce) % 2**32


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler with this ``seed`` (see ``sampler_seed``)."""
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with storage.quiet_experimental():
        return optuna.samplers.TPESampler(
            multivariate=spec.sampler.multivariate,
            n_startup_trials=spec.sampler.n_startup_trials,
            constant_liar=True,  # parallel workers: running trials count as bad, so they spread out
            seed=seed,
        )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; resources are epochs."""
    p = spec.pruner
    if p.kind == "rung_top_k":
        from cifar_hpo.pruners import make_pruner as ours

        return ours(p.kind, min_resource=p.min_resource, reduction_factor=p.reduction_factor, epochs=spec.epochs, keep=p.keep)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource=spec.epochs, reduction_factor=p.reduction_factor
        )
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def split_attrs(spec: StudySpec, split_hash: str) -> dict[str, Any]:
    """What identifies the data a study's trials saw."""
    d = spec.data
    return {"split_hash": split_hash, "data": d.source, "subset": d.subset, "val_fraction": d.val_fraction}


def open_study(spec: StudySpec, url: str, split_hash: str, st: optuna.storages.RDBStorage | None = None) -> optuna.Study:
    """Create the study, or check that an existing one has the same direction and split.

    ``st``: the storage this process already opened on ``url`` (one per process where one will do).

    Raises:
        UserError: the name exists with another direction or split (nothing is written then).
    """
    st = st or storage.open_storage(url)
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(st, include_best_trial=False)}
    wanted = split_attrs(spec, split_hash)
    existing = summaries.get(spec.name)
    if existing is not None:
        direction = existing.directions[0].name.lower() if existing.directions else "?"
        if direction != spec.direction:
            raise UserError(
                f"study {spec.name!r} in {storage.mask_url(url)} maximizes/minimizes differently ({direction}); "
                "use another study name (name = ... in the study file) or another --storage"
            )
        had = existing.user_attrs.get("split_hash")
        if had is not None and had != split_hash:
            old = {k: existing.user_attrs.get(k) for k in ("data", "subset", "val_fraction")}
            raise UserError(
                f"study {spec.name!r} in {storage.mask_url(url)} was run on another split ({old}, hash {had}); "
                f"this run's is ({ {k: wanted[k] for k in old} }, hash {split_hash}): use the same --data/--subset, "
                "another --storage, or a study file with another name"
            )
    study = optuna.create_study(
        study_name=spec.name, storage=st, direction="maximize", load_if_exists=True,  # spec checks direction
        sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec),
    )  # fmt: skip
    if existing is None:
        for key, value in {**wanted, "model": spec.model, "search_space": spec.search_space, "spec": spec.to_dict()}.items():
            study.set_user_attr(key, value)
    if (existing is None or "uid" not in existing.user_attrs) and "uid" not in study.user_attrs:
        # Tells this study from an earlier one of the same name (another database, a deleted one): its snapshots are its own.
        study.set_user_attr("uid", uuid.uuid4().hex)
    return study


def load_data(spec: StudySpec, args: argparse.Namespace, *, final: bool = False) -> Any:
    """`data.study_data` of the spec's data, with the command's ``--device``, ``--data-dir`` and ``--cache-dir``."""
    from cifar_hpo import data

    d = spec.data
    return data.study_data(
        d.source, subset=d.subset, val_fraction=d.val_fraction, split_seed=d.split_seed,
        device=getattr(args, "device", "auto"), data_dir=getattr(args, "data_dir", None),
        cache_dir=getattr(args, "cache_dir", None), final=final,
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
    """Finished or running trials numbered below ``number``."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if t.number < number)


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
            trial.set_user_attr("sampler_seed", seed)
            if _count_blocking(study, trial.number) >= spec.trials and storage.retried_trial_number(trial) is None:
                trial.set_user_attr("fail_reason", "surplus: the study already had enough finished or running trials")
                raise SurplusTrial("surplus trial, nothing run")
            if (first := storage.earlier_retry(study, trial)) is not None:  # two workers re-queued one lost trial
                trial.set_user_attr("fail_reason", f"surplus: a second retry of the same trial, #{first} is the retry")
                raise SurplusTrial("duplicate retry, nothing run")
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
                raise TrialTakenOver(f"trial #{trial.number} was failed as stale while it ran; its retry takes over") from e
            raise

    fails_in_row = 0
    started = time.time()
    while True:
        with storage.quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if finished >= spec.trials:
            break
        if timeout is not None and time.time() - started > timeout:
            log(f"--timeout {timeout:g}s reached; {finished}/{spec.trials} trials finished, run again to continue")
            break
        if finished + running >= spec.trials and not waiting:
            time.sleep(POLL_S)  # others' running trials may complete the study, or fail and free a slot
            continue
        ran.clear()
        outcome.clear()
        try:
            study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=False)
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
        if last.state == TrialState.FAIL and not str(last.user_attrs.get("fail_reason", "")).startswith("surplus"):
            fails_in_row += 1
            if fails_in_row >= MAX_FAILS_IN_ROW:
                raise UserError(
                    f"{fails_in_row} trials in a row failed, last (#{last.number}): {last.user_attrs.get('fail_reason')}; "
                    f"fix the cause (search space {spec.search_space!r}, data, memory) and run again"
                )
        else:
            fails_in_row = 0


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
    if t.state == TrialState.COMPLETE:
        what = f"complete, val_acc {t.value:.4f}"
    elif t.state == TrialState.PRUNED:
        what = f"pruned after {t.user_attrs.get('epochs_run', '?')} epochs"
    else:
        what = f"FAILED: {t.user_attrs.get('fail_reason', 'see log')}"
    return f"trial #{t.number} {what}; {done} finished, {best}"


def _worker_entry(spec: StudySpec, url: str, results: Path, args_dict: dict[str, Any], index: int, workers: int,
                  parent: int | None = None) -> None:  # fmt: skip
    """Body of one ``--workers`` process: own device share, own sampler seed.

    Exits 0 when the study is done (or ``--timeout``), 2 after a ``UserError`` (printed), 130 when
    interrupted (its trial is then failed and re-queued by ``objective``).
    """
    import sys

    import torch

    from cifar_hpo.device import cpu_threads

    # Ctrl-C reaches the whole process group; the parent turns it into exactly one SIGTERM per worker.
    # Getting SIGINT here as well would interrupt the worker while it saves and re-queues its trial.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = argparse.Namespace(**args_dict)
    where = args.device
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        args.device = where = f"cuda:{index % torch.cuda.device_count()}"  # round-robin over the visible GPUs
    elif hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // workers)
        mine = cores[(index * share) % len(cores):][:share] or cores[:share]
        os.sched_setaffinity(0, mine)  # each CPU worker gets its share of the cores
        torch.set_num_threads(cpu_threads())
        where = f"{args.device}, cpu cores {mine}"
    print(f"[w{index}] worker pid {os.getpid()} on {where}", flush=True)  # the pid to signal, for people and `bench faults`
    code = 0
    try:
        with sigterm_as_interrupt():
            st = storage.open_storage(url)  # once per process: every later step uses this one
            data = load_data(spec, args)
            prefix = f"[w{index}] "
            _reconnecting(url, lambda line: print(f"{prefix}{line}", flush=True),
                          lambda: work(spec, url, results, data, st=st, prefix=prefix, timeout=args.timeout), st=st)  # fmt: skip
    except UserError as e:
        print(f"cifar-hpo: error: [w{index}] {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"[w{index}] interrupted; its running trial is re-queued")
        code = 130
    # Everything is committed by now; skip the interpreter teardown, which takes seconds with torch
    # loaded (measured 4 s of a 4.3 s SIGTERM exit here), time a preempted machine may not have.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent(parent: int | None) -> None:
    """Linux: SIGTERM this worker when the ``run`` process (pid ``parent``) dies, so no orphan trains unseen."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if parent is not None and os.getppid() != parent:  # it died before prctl took effect: leave at once
        os._exit(130)


class DatabaseLost(BaseException):
    """The database went away during a trial.

    A BaseException, so that Optuna does not record the trial FAIL (it would, with no retry, if the
    database came back in time): the trial stays RUNNING, its heartbeat stops, and it is failed and
    re-queued exactly once by whichever worker sees it stale, like the trial of a killed worker.
    """


class TrialTakenOver(BaseException):
    """Another worker failed this worker's trial as stale (its heartbeats were late) and re-queued it.

    A BaseException, so that Optuna does not try to record the finished trial again; the worker
    drops the trial and goes on with the next one.
    """


RETRY_WRITE_S = float(os.environ.get("CIFAR_HPO_RETRY_WRITE_S", "2"))  # pause between tries of a kept result
MAX_RECONNECTS = 20  # database outages survived by one run (each up to RECONNECT_S)
RECONNECT_S = float(os.environ.get("CIFAR_HPO_RECONNECT_S", "600"))  # seconds to wait for a lost database to return


def _lost_database(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a lost or refused database connection."""
    return storage.lost_connection(e)


def _reconnecting(url: str, log: Callable[[str], None], loop: Callable[[], None],
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


MAX_WORKER_RESTARTS = 3  # per worker: a worker killed (OOM killer, kill -9) more often stays down


def _run_workers(spec: StudySpec, url: str, results: Path, args: argparse.Namespace) -> int:
    """Start ``args.workers`` worker processes and supervise them until all have exited.

    Plain ``multiprocessing`` processes, not a joblib/loky pool: loky SIGKILLs every other worker
    when one dies, and SIGKILLs them all on Ctrl-C, leaving their trials as zombies; here a killed
    worker costs only its own trial (failed once its heartbeat is stale, and retried) and is
    restarted. SIGTERM or Ctrl-C is passed on as one SIGTERM per worker: each fails and re-queues its
    trial and exits; a second signal SIGKILLs them (their trials are then retried like killed ones).

    Returns:
        0 when every worker finished, else the worst exit status (2: a worker's UserError).

    Raises:
        Interrupted: after SIGTERM or Ctrl-C, once the workers have exited.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    mp = multiprocessing.get_context("spawn")  # fork after torch (or CUDA) started threads is unsafe
    args_dict = {k: v for k, v in vars(args).items() if k != "handler"}

    def start(i: int) -> Any:
        proc = mp.Process(target=_worker_entry, args=(spec, url, results, args_dict, i, args.workers, os.getpid()),
                          name=f"cifar-hpo-w{i}")  # fmt: skip
        proc.start()
        return proc

    procs = {i: start(i) for i in range(args.workers)}
    restarts = dict.fromkeys(procs, 0)
    received: list[int] = []

    def send(sig: int) -> None:
        for proc in procs.values():
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        send(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: no forwarding
            previous[sig] = signal.signal(sig, forward)
    worst = 0
    try:
        while procs:
            wait([proc.sentinel for proc in procs.values()], timeout=1.0)
            for i, proc in list(procs.items()):
                if proc.exitcode is None:
                    continue
                proc.join()
                del procs[i]
                code = proc.exitcode
                if code < 0 and not received:
                    name = signal.Signals(-code).name
                    if restarts[i] < MAX_WORKER_RESTARTS:
                        restarts[i] += 1
                        print(f"[w{i}] worker died ({name}); its trial is retried once its heartbeat is {storage.GRACE_PERIOD}s "
                              f"stale; restarting the worker ({restarts[i]}/{MAX_WORKER_RESTARTS})", flush=True)  # fmt: skip
                        procs[i] = start(i)
                        continue
                    print(f"[w{i}] worker died ({name}) {restarts[i] + 1} times; not restarted, run the same command to continue",
                          flush=True)  # fmt: skip
                if code not in (0, 130):
                    worst = max(worst, 2 if code == 2 else 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if procs:  # the parent itself failed: stop the workers the way preemption would
            send(signal.SIGTERM)
            for proc in procs.values():
                proc.join(timeout=30)
    if received:
        raise Interrupted(f"signal {received[0]}")
    return worst


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
    data = load_data(spec, args)
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
            _reconnecting(url, print, lambda: work(spec, url, results, data, st=st, timeout=args.timeout), st=st)
    else:
        del data  # each worker process loads its own copy onto its own device
        code = _run_workers(spec, url, results, args)
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
