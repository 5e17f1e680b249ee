"""Writes the disk refuses: no space left, a read-only file system or file; each as the one line that names it.

    with refusing(path):                 # an OSError writing ``path`` (ENOSPC, EROFS, EACCES...) -> WriteRefused
        ...
    refusal(e, db)                       # the refused write behind ``e`` (a file, or SQLite's "database or disk is full"), or None
    with refusals_as_one_line(db):       # the run's loop: such an error stops it with its one line
        ...

A refused write is neither the trial's fault nor a lost database connection, and waiting does not
help: the run stops with one line that names the file system and says what to do (free space, make
it writable), and the same command run again goes on. SQLite rolls back the write it could not
make, so its file stays whole; our own files are written atomically (`checkpoint.atomic_write`),
so nothing partial is left either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from cifar_hpo.errors import UserError, chain

# Refused whatever was being done: these happen only when writing.
_NO_SPACE = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}
_ALWAYS = {*_NO_SPACE, errno.EROFS}
# Refused only where we know a write was being made (`refusing`): a read can fail with these too.
_WHEN_WRITING = {*_ALWAYS, errno.EACCES, errno.EPERM}

# SQLite's primary result codes (the low byte of an extended one).
_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_FULL = 8, 14, 13

_FREE = "free space there and run the same command again"
_WRITABLE = "make it writable (or use another folder) and run the same command again"
_WRITABLE_DB = "make it writable or pass another --storage, and run the same command again"


class WriteRefused(UserError, OSError):
    """A write the file system refused; also an ``OSError`` (its errno, the file), for code that catches those.

    Its line is ``what`` (the fact: "no space left on /data (writing /data/r/x.pt)") and ``advice``.
    """

    def __init__(self, what: str, advice: str, code: int, path: Path | str) -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.what = what
        self.advice = advice

    def __str__(self) -> str:
        return f"{self.what}; {self.advice}"


def _existing(path: Path | str) -> Path:
    """``path`` if it exists, else the nearest existing folder above it."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def mount_point(path: Path | str) -> Path:
    """The mount point of the file system that holds ``path`` (or would hold it).

    Read from the kernel's mount table where there is one: ``os.path.ismount`` misses a single file
    bind-mounted (read-only) over itself.
    """
    here = Path(os.path.realpath(_existing(path)))
    mounted = [m for m in _mount_points() if here == m or m in here.parents]
    if mounted:
        return max(mounted, key=lambda m: len(m.parts))
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def _mount_points() -> list[Path]:
    """Every mount point in ``/proc/self/mountinfo`` (its 5th field, octal escapes undone); none off Linux."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    unescape = re.compile(r"\\([0-7]{3})")
    return [Path(unescape.sub(lambda m: chr(int(m[1], 8)), line.split()[4])) for line in lines if len(line.split()) > 4]


def _read_only(path: Path) -> bool:
    """Whether ``path`` (or the file system that would hold it) is on a read-only mount."""
    try:
        return bool(os.statvfs(_existing(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def file_refusal(e: OSError, path: Path | str | None = None, *, writing: bool = False) -> WriteRefused | None:
    """``e`` as a `WriteRefused` naming ``path`` (default: the file ``e`` names), or None when it is no refused write.

    ``writing``: ``e`` was raised while writing, so a permission error is a refused write too.
    """
    if isinstance(e, WriteRefused):
        return e
    code = e.errno
    if code not in (_WHEN_WRITING if writing else _ALWAYS):
        return None
    named = path if path is not None else e.filename
    if named is None:  # a write outside `refusing`, of a file nobody named: say what the system said
        what = _NO_SPACE.get(code) or e.strerror or os.strerror(code)
        return WriteRefused(f"{what} (writing a file this run needs)", _FREE if code in _NO_SPACE else _WRITABLE, code, "?")
    target = Path(os.fsdecode(named))
    where = mount_point(target)
    if code in _NO_SPACE:
        return WriteRefused(f"{_NO_SPACE[code]} on {where} (writing {target})", _FREE, code, target)
    why = f"{where} is mounted read-only" if code == errno.EROFS or _read_only(target) else e.strerror or os.strerror(code)
    return WriteRefused(f"cannot write {target}: {why}", _WRITABLE, code, target)


def sqlite_refusal(e: BaseException, db: Path | str | None) -> WriteRefused | None:
    """An SQLite error on the database file ``db`` as a `WriteRefused`, or None when it is no refused write.

    "database or disk is full" (SQLITE_FULL); "attempt to write a readonly database" (SQLITE_READONLY);
    "unable to open database file" (SQLITE_CANTOPEN) where the file or its folder cannot be written
    (SQLite makes its -wal and -shm files beside the database).
    """
    error = getattr(e, "orig", None) or e  # SQLAlchemy wraps the driver's error
    code = getattr(error, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return None
    code &= 0xFF
    target = Path(db) if db is not None else None
    shown = f"the study database {target}" if target is not None else "the study database"
    if code == _SQLITE_FULL:
        where = f" on {mount_point(target)}" if target is not None else ""
        return WriteRefused(f"no space left{where} (writing {shown})", _FREE, errno.ENOSPC, target or "?")
    if code not in (_SQLITE_READONLY, _SQLITE_CANTOPEN):
        return None
    why = _database_unwritable(target) if target is not None else None
    if why is None and code == _SQLITE_CANTOPEN:
        return None  # a missing folder, a path that is a folder: not a refused write
    return WriteRefused(f"cannot write {shown}: {why or str(error).strip()}", _WRITABLE_DB, errno.EROFS, target or "?")


def _database_unwritable(db: Path) -> str | None:
    """Why the SQLite file ``db`` cannot be written, or None when it and its folder can (as far as ``os.access`` tells)."""
    if _read_only(db):
        return f"{mount_point(db)} is mounted read-only"
    if db.exists() and not os.access(db, os.W_OK):
        return "the file is read-only (permissions, or chattr +i)"
    if db.parent.is_dir() and not os.access(db.parent, os.W_OK | os.X_OK):
        return f"its folder {db.parent} is not writable (SQLite makes its -wal and -shm files there)"
    return None


def database_refusal(db: Path) -> WriteRefused | None:
    """A `WriteRefused` when the existing SQLite file ``db`` cannot be written (read-only file, folder or mount), else None.

    Checked before a writer opens it, so that a read-only database stops ``run`` before its data loads.
    """
    why = _database_unwritable(db)
    if why is None:
        return None
    return WriteRefused(f"cannot write the study database {db}: {why}", _WRITABLE_DB, errno.EROFS, db)


def refusal(e: BaseException, db: Path | str | None = None) -> WriteRefused | None:
    """The refused write behind ``e`` (``e`` itself, or what it was raised from or while handling), or None.

    ``db``: the SQLite file of the study database, named in the line for SQLite's refusals.
    """
    for err in chain(e):
        if isinstance(err, WriteRefused):
            return err
        found = file_refusal(err) if isinstance(err, OSError) else sqlite_refusal(err, db)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def refusing(path: Path | str) -> Iterator[None]:
    """Raise a refused write of ``path`` in the block (no space, read-only, no permission) as its `WriteRefused`."""
    try:
        yield
    except OSError as e:
        found = file_refusal(e, path, writing=True)
        if found is None or found is e:
            raise
        raise found from e


@contextlib.contextmanager
def refusals_as_one_line(db: Path | str | None = None) -> Iterator[None]:
    """Raise an error of the block that a refused write caused as that write's one-line `WriteRefused`.

    For a run's loop: retrying the trial or waiting for the database does not help, the user must
    free space. Ctrl-C and SIGTERM pass unchanged (the interrupted trial is saved and re-queued).
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # also the BaseExceptions that stop a trial (study.objective.TrialNotSaved)
        found = refusal(e, db)
        if found is None or found is e:
            raise
        raise found from None
