"""SQLite set-up: created 0600 through SQLite only, checked, write-ahead logging, BEGIN IMMEDIATE, one schema creator."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from cifar_hpo.errors import UserError, first_line
from cifar_hpo.storage.refused import database_refusal, sqlite_refusal

SQLITE_BUSY_TIMEOUT_S = 120


def _prepare_sqlite(url: str) -> Path | None:
    """Create the SQLite file (0600) if needed, check it and switch it to WAL, through SQLite only.

    The file is never opened with a plain ``open()``: closing any descriptor of a database file
    drops every POSIX lock this process holds on it (SQLite's "How To Corrupt" section 2), so a
    header read in a process that already has connections (a second ``open_storage``) left the run
    holding no lock, and the next reader to close its connection deleted the run's WAL under it.
    SQLite's own connections share one lock table per file within a process, so they are safe.

    Returns:
        The file, when this call created it (`remove_new_sqlite` removes it again if the schema
        cannot be made either); None for an existing file.

    Raises:
        UserError: the file cannot be created, is damaged, or cannot be written (`WriteRefused`:
            a writer stops before its data loads, not at its first write); a file made here is
            removed again, so a full disk leaves no empty database behind.
    """
    path = make_url(url).database
    if not path or path == ":memory:":
        return None
    db = Path(path)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"storage {url}: cannot create folder {db.parent} ({e.strerror}); pass another --storage") from None
    created = False
    try:
        # Created empty with mode 0600 before SQLite opens it (SQLite accepts an empty file as a new
        # database and gives its -wal/-shm files the same mode), so it is never readable by others.
        # O_EXCL: an existing file is not opened here at all.
        os.close(os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        created = True
    except FileExistsError:
        if (refused := database_refusal(db)) is not None:
            raise refused from None
    except OSError as e:
        raise UserError(f"storage {url}: cannot create {db} ({e.strerror}); pass another --storage") from None
    try:
        con = sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            _quick_check(con, db)  # before anything is written
            # WAL persists in the file: set once, every later connection uses it.
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except BaseException as e:
        if created:
            remove_new_sqlite(db)
        if isinstance(e, sqlite3.DatabaseError):
            raise UserError(sqlite_error_text(db, e)) from None
        raise
    return db if created else None


def remove_new_sqlite(db: Path) -> None:
    """Remove the SQLite file ``db`` that this process has just created, with the -wal, -shm and -journal files SQLite made beside it.

    Only for a file made by `_prepare_sqlite` in this call (under `_schema_lock`, so no other
    process on this machine has opened it yet) whose set-up failed: a full disk left a 0-byte
    database behind that the next run had to be told about.
    """
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            Path(f"{db}{suffix}").unlink(missing_ok=True)


def _quick_check(con: sqlite3.Connection, db: Path) -> None:
    """Refuse a damaged file; quick_check reports damage as rows, not as an exception."""
    verdict = con.execute("PRAGMA quick_check").fetchone()
    if verdict is None or verdict[0] != "ok":
        raise UserError(
            f"storage {db} is damaged (SQLite's quick_check: {verdict[0] if verdict else 'no answer'}); "
            "restore a backup or move it away and pass another --storage"
        )


def read_only_connect(db: Path) -> Callable[[], sqlite3.Connection]:
    """SQLAlchemy's ``creator`` for read-only connections to ``db``: what a reader does cannot change the file.

    ``mode=ro``: no schema, journal mode, checkpoint or recovery write. SQLite still opens the -shm and
    -wal files of a WAL database (and makes them when no writer has), which its readers need to see a
    running study's latest commits; ``immutable=1`` would skip them and misread a live database.
    """
    uri = db.absolute().as_uri() + "?mode=ro"
    return lambda: sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)


# Tables every Optuna database has: Optuna's own names (tests/test_bad_inputs.py checks them on a new database).
OPTUNA_TABLES = frozenset({"studies", "version_info"})


def check_study_file(db: Path, *, empty_ok: bool = False) -> bool:
    """Refuse an existing SQLite file that is no study database, reading it only.

    Args:
        db: the file.
        empty_ok: an empty file or database (no table at all: what `_prepare_sqlite` leaves when
            a run stops before the schema) is no database yet instead of an error.

    Returns:
        True for a study database, False for an empty one (with ``empty_ok``).

    Raises:
        UserError: the file is empty, not an SQLite database, damaged, or another program's database.
    """
    if db.stat().st_size == 0:  # os.stat, never open(): see `_prepare_sqlite`
        if empty_ok:
            return False
        raise UserError(_empty_text(db, "an empty file (0 bytes)"))
    try:
        con = read_only_connect(db)()
        try:
            _quick_check(con, db)
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(sqlite_error_text(db, e)) from None
    if not tables and empty_ok:
        return False
    if not tables:
        raise UserError(_empty_text(db, "an empty SQLite database"))
    if not OPTUNA_TABLES <= tables:
        raise UserError(f"storage {db} is an SQLite database without Optuna's tables, not a study database; pass the study's --storage")
    return True


def _empty_text(db: Path, what: str) -> str:
    return f"storage {db} is {what}, not a study database; pass the study's --storage, or remove it"


def sqlite_error_text(db: Path | str, e: BaseException) -> str:
    """One line for an SQLite error on ``db`` that says what happened, without calling a healthy file damaged."""
    if (refused := sqlite_refusal(e, db)) is not None:
        return str(refused)  # full, or read-only: names the file system and what to do
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


def sqlite_file(url: str) -> Path | None:
    """The SQLite file ``url`` names; None for another database, an in-memory one or a malformed URL."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None  # open_storage reports the malformed URL
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def missing_sqlite(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist yet (readers must not create it), else None."""
    path = sqlite_file(url)
    return None if path is None or path.is_file() else path


def check_creatable(db: Path, *, make_folders: bool = True) -> None:
    """Raise UserError unless an SQLite file could be created at ``db`` (checked without creating anything).

    ``make_folders``: whether missing folders above ``db`` may be made (the default place under
    ``--results``); a path the user typed must be in a folder that exists, or a typo makes folders anywhere.
    """
    if not make_folders and not db.parent.is_dir():
        raise UserError(
            f"storage {db}: folder {db.parent} does not exist; create it first (mkdir -p {db.parent}) or pass another --storage"
        )
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"storage {db}: cannot create it, {folder} is not a writable folder; pass another --storage or --results")
