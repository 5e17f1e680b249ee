"""Storage URL -> Optuna storage, with heartbeats, retries and masked URLs.

    --storage sqlite:///results/cifar_hpo.db            # default, one machine
    --storage postgresql://user:pw@db-host/hpo          # many machines
    CIFAR_HPO_STORAGE=postgresql://... cifar-hpo run ...

SQLite is set up so that optuna-dashboard or the ``optuna`` CLI reading the
database while a study runs never breaks the run: write-ahead logging (readers
never block the writer) and a long busy timeout (writers wait instead of
failing with "database is locked"). Every trial sends a heartbeat; a trial
whose worker died (kill -9, power loss) is failed when the study next runs and
re-queued with the same parameters and its intermediate values, and resumes
from its last saved epoch (see ``objective``).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from cifar_hpo import optuna_compat
from cifar_hpo.errors import UserError, caused_by, first_line

ENV_VAR = "CIFAR_HPO_STORAGE"
DB_NAME = "cifar_hpo.db"
# Seconds between heartbeats, and silence after which a RUNNING trial is stale.
HEARTBEAT_INTERVAL = int(os.environ.get("CIFAR_HPO_HEARTBEAT", "20"))
GRACE_PERIOD = int(os.environ.get("CIFAR_HPO_GRACE", str(3 * HEARTBEAT_INTERVAL)))
MAX_RETRY = 2  # a trial killed more often than this stays FAIL
# Seconds after which a RUNNING trial that never got a single heartbeat is failed as stale: its worker
# died between taking it and its first heartbeat. Long, because trial start times come from the
# workers' clocks, which may disagree between machines (heartbeats use the database server's).
ORPHAN_S = float(os.environ.get("CIFAR_HPO_ORPHAN_S", str(max(600, 10 * GRACE_PERIOD))))
SQLITE_BUSY_TIMEOUT_S = 120
# How long the worker that failed a stale trial keeps trying to add its retry through a database
# outage (the same limit as a worker waiting for a lost database), and the pause between tries.
REQUEUE_S = float(os.environ.get("CIFAR_HPO_RECONNECT_S", "600"))
REQUEUE_PAUSE_S = 2.0


def storage_url(arg: str | None, results: Path) -> str:
    """The storage URL: ``--storage``, else ``$CIFAR_HPO_STORAGE``, else SQLite in ``results``."""
    url = arg or os.environ.get(ENV_VAR)
    if url:
        return url
    return f"sqlite:///{(results / DB_NAME).as_posix()}"


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log).

    Parsed by hand, not by SQLAlchemy: the password is everything between the first ``:`` of the
    credentials and the *last* ``@`` (an unescaped ``@`` in a password otherwise leaks its tail),
    with or without a ``scheme://`` in front.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds or "/" in creds.split(":", 1)[0]:
        return url
    user = creds.split(":", 1)[0]
    return f"{head}{sep}{user}:***@{host}"


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for features we use on purpose (heartbeats, retries, TPE options)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _retry_callback(max_retry: int | None = MAX_RETRY) -> Any:
    with quiet_experimental():
        return optuna_compat.retry_callback_class()(max_retry=max_retry, inherit_intermediate_values=True)


def retried_trial_number(trial: optuna.Trial) -> int | None:
    """Number of the original trial that ``trial`` retries (after a kill or an interrupt), or None."""
    # The retry callback records the lineage's first trial under this system attribute.
    value = trial.storage.get_trial_system_attrs(optuna_compat.trial_id(trial)).get("failed_trial")
    return None if value is None else int(value)


def earlier_retry(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """Number of an earlier retry of the trial that ``trial`` retries (then ``trial`` is a duplicate), or None."""
    history = trial.storage.get_trial_system_attrs(optuna_compat.trial_id(trial)).get("retry_history") or []
    if not history:
        return None
    for t in study.get_trials(deepcopy=False):
        if t.number < trial.number and (t.system_attrs.get("retry_history") or [None])[-1] == history[-1]:
            return t.number
    return None


def requeue_interrupted(study: optuna.Study, trial_number: int) -> None:
    """Re-queue an interrupted trial (same params, its intermediate values), as Optuna does for a stale one.

    The interrupted trial itself is always re-queued; but it joins the retry history, so a
    lineage interrupted twice and then killed once has used up ``MAX_RETRY`` and is not retried again.
    """
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial_number)
    with quiet_experimental():
        _retry_callback(max_retry=None)(study, frozen)


def _prepare_sqlite(url: str) -> None:
    """Create the SQLite file (0600) if needed, check it and switch it to WAL, through SQLite only.

    The file is never opened with a plain ``open()``: closing any descriptor of a database file
    drops every POSIX lock this process holds on it (SQLite's "How To Corrupt" section 2), so a
    header read in a process that already has connections (a second ``open_storage``) left the run
    holding no lock, and the next reader to close its connection deleted the run's WAL under it.
    SQLite's own connections share one lock table per file within a process, so they are safe.
    """
    path = make_url(url).database
    if not path or path == ":memory:":
        return
    db = Path(path)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"storage {url}: cannot create folder {db.parent} ({e.strerror}); pass another --storage") from None
    try:
        # Created empty with mode 0600 before SQLite opens it (SQLite accepts an empty file as a new
        # database and gives its -wal/-shm files the same mode), so it is never readable by others.
        # O_EXCL: an existing file is not opened here at all.
        os.close(os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(f"storage {url}: cannot create {db} ({e.strerror}); pass another --storage") from None
    try:
        con = sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            # Checked before anything is written. quick_check reports damage as rows, not as an exception.
            verdict = con.execute("PRAGMA quick_check").fetchone()
            if verdict is None or verdict[0] != "ok":
                raise UserError(
                    f"storage {db} is damaged (SQLite's quick_check: {verdict[0] if verdict else 'no answer'}); "
                    "restore a backup or move it away and pass another --storage"
                )
            # WAL persists in the file: set once, every later connection uses it.
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(sqlite_error_text(db, e)) from None


def sqlite_error_text(db: Path | str, e: BaseException) -> str:
    """One line for an SQLite error on ``db`` that says what happened, without calling a healthy file damaged."""
    reason = first_line(e)
    if "not a database" in reason or "malformed" in reason:
        return f"storage {db} is not an SQLite database, or is corrupt ({reason}); move it away or pass another --storage"
    if "locked" in reason or "busy" in reason:
        return f"storage {db} is locked by another process ({reason}); wait for it or pass another --storage"
    # disk I/O error, read-only or full disk, permissions: the file itself may be fine.
    return (
        f"storage {db} could not be read or written ({reason}); check the disk (space, permissions, a network "
        "file system without locking) and run the same command again"
    )


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Serialize creating or upgrading the schema of one SQLite file between processes on this machine.

    Two ``run``s started together on a fresh file both saw no tables and both created them; the
    second died on "table studies already exists". The lock is an ``flock`` on the database's folder
    (no extra file, and never a descriptor of the database itself), held only while opening.
    """
    import fcntl

    path = make_url(url).database
    if not path or path == ":memory:":
        yield
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"storage {url}: cannot create or open folder {folder} ({e.strerror}); pass another --storage") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _already_exists(e: BaseException) -> bool:
    """Another process created the same table or row a moment before this one (concurrent first start)."""
    text = str(getattr(e, "orig", None) or e).lower()
    return "already exists" in text or "duplicate" in text or "unique constraint" in text


def _sqlite_begin_immediate(engine: sqlalchemy.engine.Engine) -> None:
    """Make every SQLite transaction of ``engine`` take the write lock at BEGIN.

    pysqlite starts a transaction only at the first write, after the reads of the same session:
    two workers could both read a WAITING trial and both set it RUNNING (Optuna's
    ``SELECT ... FOR UPDATE`` is a no-op on SQLite), so a re-queued trial ran twice. With
    BEGIN IMMEDIATE a session's reads and writes are one atomic step, and waiting for the lock
    goes through the busy timeout instead of failing with "database is locked". (SQLAlchemy's
    documented recipe for serializable SQLite.)
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own; ours below

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna set up the schema predate the listeners


class _HeartbeatFromStart(optuna.storages.RDBStorage):
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
        stale = super()._get_stale_trial_ids(study_id)
        # Optuna skips RUNNING trials without any heartbeat; they would block the study for ever.
        cutoff = datetime.now(UTC) - timedelta(seconds=ORPHAN_S)
        running = {
            optuna_compat.trial_id(t): t.datetime_start
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        }
        beating = _with_heartbeat(self.engine, [tid for tid in running if tid not in stale])
        # datetime_start: naive local time up to Optuna 4.x, aware UTC from 5.0; astimezone reads both.
        orphans = [tid for tid, start in running.items()
                   if tid not in stale and tid not in beating and start is not None and start.astimezone(UTC) < cutoff]  # fmt: skip
        marked = []
        for tid in stale + orphans:
            # Said before Optuna fails it (a finished trial's attributes cannot change), so that the FAIL
            # has a reason in `status` and the dashboard instead of an empty one.
            why = (f"stale: no heartbeat for {GRACE_PERIOD}s (its worker was killed, or lost the database); retried"
                   if tid in stale else f"stale: no heartbeat at all in {ORPHAN_S:g}s since it started; retried")  # fmt: skip
            try:
                self.set_trial_user_attr(tid, "fail_reason", why)
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
        callback = optuna_compat.stale_trial_callback(self)
        if callback is None:
            return
        trials = self.get_all_trials(study_id, deepcopy=False)
        retried = {(t.system_attrs.get("retry_history") or [None])[-1] for t in trials}
        for t in trials:
            if (t.state == TrialState.FAIL and t.number not in retried
                    and str(t.user_attrs.get("fail_reason", "")).startswith("stale")
                    and len(t.system_attrs.get("retry_history") or []) + 1 <= MAX_RETRY
                    and t.datetime_complete is not None and t.datetime_complete.astimezone(UTC) < cutoff):  # fmt: skip
                callback(optuna.load_study(study_name=self.get_study_name_from_id(study_id), storage=self), t)

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
    return any((t.system_attrs.get("retry_history") or [None])[-1] == number for t in st.get_all_trials(study_id, deepcopy=False))


def lost_connection(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from or while handling, is a lost or refused database connection."""
    return caused_by(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError))


def _with_heartbeat(engine: sqlalchemy.engine.Engine, trial_ids: list[int]) -> set[int]:
    """Those of ``trial_ids`` that ever sent a heartbeat (a row in Optuna's heartbeat table)."""
    if not trial_ids:
        return set()
    query = sqlalchemy.text(f"SELECT trial_id FROM {optuna_compat.HEARTBEAT_TABLE} WHERE trial_id IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True)
    )
    with engine.connect() as con:
        return {int(row[0]) for row in con.execute(query, {"ids": trial_ids})}


def open_storage(url: str, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna storage at ``url``.

    Raises:
        UserError: malformed URL, missing driver, unreachable server, damaged file.
    """
    shown = mask_url(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:  # ValueError: e.g. a port that is not a number
        detail = f" ({e})" if isinstance(e, ValueError) else ""
        raise UserError(
            f"storage URL {shown!r} is malformed{detail}; expected e.g. sqlite:///results/cifar_hpo.db or postgresql://user@host:5432/db"
        ) from None
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # reconnect after a server restart
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": HEARTBEAT_INTERVAL, "grace_period": GRACE_PERIOD}
        kwargs[optuna_compat.stale_callback_argument()] = _retry_callback()
    sqlite = parsed.get_backend_name() == "sqlite"
    try:
        for attempt in range(5):
            try:
                with _schema_lock(url) if sqlite else contextlib.nullcontext(), quiet_experimental():
                    if sqlite:
                        _prepare_sqlite(url)
                    st = _HeartbeatFromStart(url, engine_kwargs=engine_kwargs, **kwargs)
                break
            except sqlalchemy.exc.DBAPIError as e:
                # Another process (another machine, for a server) created the schema at the same moment.
                if attempt == 4 or not _already_exists(e):
                    raise
                time.sleep(0.2 + random.random())
        if sqlite:
            _sqlite_begin_immediate(st.engine)
        return st
    except ImportError:
        raise UserError(
            f"storage {shown}: the database driver for {parsed.drivername!r} is not installed; pip install -e '.[postgres]' (or [mysql])"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        if sqlite:
            raise UserError(sqlite_error_text(parsed.database or shown, e)) from None
        reason = first_line(e)
        raise UserError(f"storage {shown} cannot be opened ({reason}); check the URL and that the server is running") from None
    except RuntimeError as e:  # e.g. schema version mismatch
        raise UserError(f"storage {shown}: {e}") from None


def ping(st: optuna.storages.RDBStorage) -> None:
    """One round trip to ``st``'s database on a fresh connection.

    Raises:
        sqlalchemy.exc.DBAPIError: the database is still out of reach.
    """
    st.engine.dispose()  # pooled connections may be dead (server restart) or broken (I/O error)
    with st.engine.connect() as con:
        con.exec_driver_sql("SELECT 1")


def missing_sqlite(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist yet (readers must not create it), else None."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None  # open_storage reports the malformed URL
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.is_file() else path


def check_creatable(db: Path) -> None:
    """Raise UserError unless an SQLite file could be created at ``db`` (checked without creating anything)."""
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"storage {db}: cannot create it, {folder} is not a writable folder; pass another --storage or --results")


def open_existing(url: str) -> optuna.storages.RDBStorage | None:
    """Open a storage for reading, or return None for an SQLite file that does not exist (never creates one)."""
    return None if missing_sqlite(url) is not None else open_storage(url, heartbeat=False)


def artifact_dir(url: str, results: Path) -> Path:
    """The artifact store's folder: beside an SQLite file, else ``results/artifacts``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).parent / "artifacts"
    return results / "artifacts"


class _OwnerOnlyArtifactStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's file-system artifact store, writing each file atomically with mode 0600.

    Artifacts include the best trials' checkpoints; Optuna's own ``write`` creates them with the
    umask's mode (world-readable by default) and in place (a kill leaves a partial file).
    Optuna's store keeps artifact ``ID`` at ``base_path/ID`` (its reader opens exactly that;
    tests/test_optuna_compat.py reads ours back through Optuna's own store).
    """

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.folder = Path(base_path)

    def path_of(self, artifact_id: str) -> Path:
        """Where artifact ``artifact_id`` lives; an id that would leave the folder is refused."""
        path = self.folder / artifact_id
        base = os.path.abspath(self.folder)
        if os.path.isabs(artifact_id) or os.path.commonpath([base, os.path.abspath(path)]) != base:
            raise ValueError(f"Invalid artifact_id: {artifact_id}")
        return path

    def write(self, artifact_id: str, content_body: Any) -> None:
        from cifar_hpo.checkpoint import atomic_write_bytes  # lazy: torch is not needed to read a study

        atomic_write_bytes(self.path_of(artifact_id), content_body.read())


def artifact_store(url: str, results: Path) -> optuna.artifacts.FileSystemArtifactStore:
    """Optuna's file-system artifact store for this storage (created if needed)."""
    folder = artifact_dir(url, results)
    folder.mkdir(parents=True, exist_ok=True)
    return _OwnerOnlyArtifactStore(str(folder))


def best_value(study: optuna.Study | None) -> float | None:
    """The study's best value, or None without a study or without a complete trial."""
    if study is None:
        return None
    try:
        return float(study.best_value)
    except ValueError:
        return None
