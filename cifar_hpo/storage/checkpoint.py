"""Atomic checkpoint writes and safe loads.

Writes go to a temporary file in the same folder, are fsynced, then
``os.replace``d over the target, so a reader (or a crash) never sees a
partial file. Loads use ``torch.load(weights_only=True)``, which refuses
pickled code: a planted malicious file raises instead of running.
Files are created readable by their owner only (0600).
"""

from __future__ import annotations

import io
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from cifar_hpo.errors import UserError, first_line
from cifar_hpo.storage.refused import refusing


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], mode: int = 0o600) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it over ``path``.

    A crash or an exception at any point leaves either the old file or the new
    one, never a partial one, and no temp file behind.

    Raises:
        WriteRefused: no space left, a read-only file system, no permission (its one line names
            ``path`` and the file system); also an OSError.
    """
    path = Path(path)
    with refusing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's host and pid are in the name, so that `remove_stale_tmp` can tell a file left by
        # a killed writer (SIGKILL, power loss) from one being written right now.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
_TMP_NAME = re.compile(r"^\..+\.(?P<host>[^.-]+)-(?P<pid>\d+)-[^.]*\.tmp$")
STALE_TMP_S = 24 * 3600  # a temp file of another host (shared folder) this old is abandoned


def remove_stale_tmp(folder: str | os.PathLike[str], *, recursive: bool = True) -> int:
    """Delete temp files under ``folder`` whose writer is gone: a dead pid on this host, or a day old.

    ``recursive``: also in its subfolders (else only in ``folder`` itself).

    Returns:
        How many files were deleted.
    """
    removed = 0
    for tmp in (Path(folder).rglob if recursive else Path(folder).glob)(".*.tmp"):
        m = _TMP_NAME.match(tmp.name)
        try:
            if m and m["host"] == _HOST:
                stale = not _alive(int(m["pid"]))
            else:
                stale = time.time() - tmp.stat().st_mtime > STALE_TMP_S
            if stale and tmp.is_file():
                tmp.unlink()
                removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to delete
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with permission ``mode``."""
    atomic_write(path, lambda f: f.write(data), mode)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, os.replace)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        UserError: the file is missing, truncated, corrupt, or holds pickled
            objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or run the command that writes it")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        first = first_line(e)
        raise UserError(
            f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: {first[:160]}); "
            "it is corrupt, truncated or not a cifar-hpo checkpoint: delete it and write it again"
        ) from None
