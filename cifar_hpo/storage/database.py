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
import random
import sqlite3
import time
from typing import Any

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from cifar_hpo.errors import UserError, first_line
from cifar_hpo.storage import heartbeat as beats
from cifar_hpo.storage import optuna_compat
from cifar_hpo.storage.connection import mask_url, quiet_experimental
from cifar_hpo.storage.sqlite import (
    SQLITE_BUSY_TIMEOUT_S,
    _already_exists,
    _prepare_sqlite,
    _schema_lock,
    _sqlite_begin_immediate,
    missing_sqlite,
    sqlite_error_text,
)


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
        kwargs = {"heartbeat_interval": beats.HEARTBEAT_INTERVAL, "grace_period": beats.GRACE_PERIOD}
        kwargs[optuna_compat.stale_callback_argument()] = beats.retry_callback()
    sqlite = parsed.get_backend_name() == "sqlite"
    try:
        for attempt in range(5):
            try:
                with _schema_lock(url) if sqlite else contextlib.nullcontext(), quiet_experimental():
                    if sqlite:
                        _prepare_sqlite(url)
                    st = beats.HeartbeatStorage(url, engine_kwargs=engine_kwargs, **kwargs)
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


def open_existing(url: str) -> optuna.storages.RDBStorage | None:
    """Open a storage for reading, or return None for an SQLite file that does not exist (never creates one)."""
    return None if missing_sqlite(url) is not None else open_storage(url, heartbeat=False)
