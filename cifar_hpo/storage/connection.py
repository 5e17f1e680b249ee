"""Storage URLs, masked for printing, and what a lost database connection looks like."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy.event
import sqlalchemy.exc

from cifar_hpo.errors import caused_by

ENV_VAR = "CIFAR_HPO_STORAGE"


DB_NAME = "cifar_hpo.db"


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


def lost_connection(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from or while handling, is a lost or refused database connection."""
    return caused_by(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError))


def ping(st: optuna.storages.RDBStorage) -> None:
    """One round trip to ``st``'s database on a fresh connection.

    Raises:
        sqlalchemy.exc.DBAPIError: the database is still out of reach.
    """
    st.engine.dispose()  # pooled connections may be dead (server restart) or broken (I/O error)
    with st.engine.connect() as con:
        con.exec_driver_sql("SELECT 1")


def best_value(study: optuna.Study | None) -> float | None:
    """The study's best value, or None without a study or without a complete trial."""
    if study is None:
        return None
    try:
        return float(study.best_value)
    except ValueError:
        return None
