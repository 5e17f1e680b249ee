"""Storage URL -> Optuna storage, with heartbeats, retries and masked URLs.

    --storage sqlite:///results/cifar_hpo.db            # default, one machine
    --storage postgresql+psycopg://user:pw@db-host/hpo  # many machines
    CIFAR_HPO_STORAGE=postgresql://... cifar-hpo run ...

SQLite is set up so that optuna-dashboard or the ``optuna`` CLI reading the
database while a study runs never breaks the run: write-ahead logging (readers
never block the writer) and a long busy timeout (writers wait instead of
failing with "database is locked"). Every trial sends a heartbeat; a trial
whose worker died (kill -9, power loss) is failed when the study next runs and
re-queued with the same parameters and its intermediate values, and resumes
from its last saved epoch (see ``objective``).

Readers (status, report, retrain's reads, the dashboard) use `open_existing`,
which changes nothing while opening: no file, folder, schema or journal mode.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from cifar_hpo.errors import UserError, first_line
from cifar_hpo.storage import heartbeat as beats
from cifar_hpo.storage import optuna_compat
from cifar_hpo.storage.connection import mask_url, quiet_experimental
from cifar_hpo.storage.sqlite import (
    OPTUNA_TABLES,
    SQLITE_BUSY_TIMEOUT_S,
    _already_exists,
    _prepare_sqlite,
    _schema_lock,
    _sqlite_begin_immediate,
    check_study_file,
    missing_sqlite,
    read_only_connect,
    remove_new_sqlite,
    sqlite_error_text,
)


def open_storage(url: str, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna storage at ``url``.

    Raises:
        UserError: malformed URL, missing driver, unreachable server, damaged file; an SQLite file
            that cannot be written (`refused.WriteRefused`: read-only, or no space to create it).
    """
    parsed = _parse(url)
    engine_kwargs = _engine_kwargs(parsed)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": beats.HEARTBEAT_INTERVAL, "grace_period": beats.GRACE_PERIOD}
        kwargs[optuna_compat.stale_callback_argument()] = beats.retry_callback()
    sqlite = parsed.get_backend_name() == "sqlite"
    with _one_line(url, parsed):
        for attempt in range(5):
            try:
                with _schema_lock(url) if sqlite else contextlib.nullcontext(), quiet_experimental():
                    created = _prepare_sqlite(url) if sqlite else None
                    try:
                        st = beats.HeartbeatStorage(url, engine_kwargs=engine_kwargs, **kwargs)
                    except BaseException:
                        if created is not None:
                            remove_new_sqlite(created)  # its schema could not be made (a full disk): no empty database left
                        raise
                break
            except sqlalchemy.exc.DBAPIError as e:
                # Another process (another machine, for a server) created the schema at the same moment.
                if attempt == 4 or not _already_exists(e):
                    raise
                time.sleep(0.2 + random.random())
        if sqlite:
            _sqlite_begin_immediate(st.engine)
    return st


def _parse(url: str) -> URL:
    """``url`` parsed by SQLAlchemy.

    Raises:
        UserError: it is malformed (the message shows it with the password masked).
    """
    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:  # ValueError: e.g. a port that is not a number
        detail = f" ({e})" if isinstance(e, ValueError) else ""
        raise UserError(
            f"storage URL {mask_url(url)!r} is malformed{detail}; expected e.g. sqlite:///results/cifar_hpo.db or postgresql+psycopg://user@host:5432/db"
        ) from None


def _engine_kwargs(parsed: URL) -> dict[str, Any]:
    """SQLAlchemy engine options: SQLite waits for locks (busy timeout), a server's pooled connections are checked."""
    if parsed.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": True}  # reconnect after a server restart


@contextlib.contextmanager
def _one_line(url: str, parsed: URL) -> Iterator[None]:
    """Every way opening the storage at ``url`` fails, as one UserError line (password masked)."""
    shown = mask_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    try:
        yield
    except ImportError:
        hint = _driver_hint(parsed)
        raise UserError(f"storage {shown}: the database driver for {parsed.drivername!r} is not installed; {hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
        if sqlite:
            raise UserError(sqlite_error_text(parsed.database or shown, e)) from None
        reason = first_line(e)
        raise UserError(f"storage {shown} cannot be opened ({reason}); check the URL and that the server is running") from None
    except RuntimeError as e:  # e.g. schema version mismatch
        raise UserError(f"storage {shown}: {e}") from None


# backend: (the driver our extra installs, the extra)
_EXTRAS = {"postgresql": ("psycopg", "postgres"), "mysql": ("pymysql", "mysql"), "mariadb": ("pymysql", "mysql")}


def _driver_hint(parsed: URL) -> str:
    """How to get the driver a URL needs; SQLAlchemy's default for mysql:// (mysqldb) is not the one ``[mysql]`` installs."""
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend not in _EXTRAS:
        return f"install the {driver} driver (pip); the extras cover PostgreSQL ('cifar-hpo[postgres]') and MySQL ('cifar-hpo[mysql]')"
    ours, extra = _EXTRAS[backend]
    if driver == ours:
        return f"pip install 'cifar-hpo[{extra}]'"
    instead = f"use {backend}+{ours}://... instead, with pip install 'cifar-hpo[{extra}]'"
    if "+" in parsed.drivername:
        return f"install {driver} yourself, or {instead}"
    return f"{backend}:// alone means SQLAlchemy's default driver, {driver}, not the {ours} that cifar-hpo[{extra}] installs: {instead}"


def open_existing(url: str, *, writable: bool = False, empty_ok: bool = False) -> optuna.storages.RDBStorage | None:
    """Open an existing storage as it is, for reading; None where no study database is yet.

    Nothing is written while opening (no file, folder, schema, journal mode or permission bits
    change): a database another tool made stays as it was. An SQLite file is checked first
    (`check_study_file`) and read through read-only connections (`read_only_connect`).

    Args:
        url: the storage URL.
        writable: read-write connections (the dashboard, where people edit notes); still nothing
            is written while opening.
        empty_ok: an empty SQLite file or database is no database yet (None) instead of an
            error: ``run`` makes one before its schema, and fills one left by a run stopped in between.

    Returns:
        the storage, without heartbeats; None for an SQLite file that does not exist (or an
        in-memory database) or a server database without Optuna's tables.

    Raises:
        UserError: malformed URL, missing driver, unreachable server; an SQLite file that is
            empty, not a database, damaged or without Optuna's tables.
    """
    if missing_sqlite(url) is not None:
        return None
    parsed = _parse(url)
    engine_kwargs = _engine_kwargs(parsed)
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database in (None, "", ":memory:"):
        return None  # a new in-memory database: no study in it
    with _one_line(url, parsed), quiet_experimental():
        if sqlite:
            db = Path(parsed.database or "")
            if not check_study_file(db, empty_ok=empty_ok):
                return None
            if not writable:
                engine_kwargs["creator"] = read_only_connect(db)
        elif not _has_optuna_tables(url, engine_kwargs):
            return None
        st = beats.HeartbeatStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
    if sqlite and writable:
        _sqlite_begin_immediate(st.engine)
    return st


def _has_optuna_tables(url: str, engine_kwargs: dict[str, Any]) -> bool:
    """Whether the server database at ``url`` has Optuna's tables (looked up, nothing created)."""
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        inspector = sqlalchemy.inspect(engine)
        return all(inspector.has_table(table) for table in OPTUNA_TABLES)
    finally:
        engine.dispose()
