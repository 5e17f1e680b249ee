"""SQLite set-up: created 0600 through SQLite only, checked, write-ahead logging, BEGIN IMMEDIATE, one schema creator."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from cifar_hpo.errors import UserError, first_line

SQLITE_BUSY_TIMEOUT_S = 120


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
