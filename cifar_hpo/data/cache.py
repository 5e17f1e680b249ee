"""The decoded-array cache: ``CACHE_DIR/<name>-<key>.npz``, keyed by the source's content, written atomically."""

from __future__ import annotations

import errno
import hashlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifar_hpo.data.decode import IMAGE_SIZE, Arrays
from cifar_hpo.data.sources import _listing, cache_home
from cifar_hpo.errors import first_line

if TYPE_CHECKING:  # torch is imported lazily: decoding workers must start fast
    pass


CACHE_VERSION = 1  # bump when decoding changes, so old cache files are not used


# The cache folder cannot be written at all (read-only, no permission, under a regular file, itself a file).
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)


def _cache_file(cache_dir: Path | None, path: Path, key: str) -> Path:
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_home() / "decoded"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name) or "data"
    return folder / f"{name}-{key[:16]}.npz"


def _read_cache(cache: Path, key: str) -> Arrays | None:
    """The cached arrays, or None when the file is missing, unreadable or for another key."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return (
                z["train_x"],
                z["train_y"],
                z["test_x"],
                z["test_y"],
                tuple(str(c) for c in z["classes"]),
            )
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


def _write_cache(cache: Path, key: str, arrays: Arrays) -> None:
    """Write the arrays atomically: temp file in the same folder, fsync, os.replace.

    Two processes decoding the same source at once both write; readers see one whole file or the
    other. Temp files of a decoder that was killed are deleted first (they can be gigabytes).

    A folder that cannot be written (read-only, under a regular file) is said in one line on stderr and
    the arrays are used uncached: the data itself is fine, only the next load decodes again.
    """
    from cifar_hpo.storage.checkpoint import atomic_write, remove_stale_tmp  # imports torch: decoding workers start without it

    if cache.parent.is_dir():
        remove_stale_tmp(cache.parent)
    train_x, train_y, test_x, test_y, classes = arrays
    try:
        atomic_write(
            cache,
            lambda f: np.savez(
                f, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                classes=np.array(classes, dtype=str), key=np.array(key),
            ),  # fmt: skip
        )
    except OSError as e:  # atomic_write leaves no temp file behind
        if e.errno not in UNWRITABLE:
            raise
        print(f"note: decoded images not cached: cannot write {cache.parent} ({e.strerror or first_line(e)}); they are decoded "
              "again next time; pass --cache-dir or set CIFAR_HPO_CACHE to a writable folder", file=sys.stderr, flush=True)  # fmt: skip


def _source_key(kind: str, path: Path) -> str:
    """sha256 hex of the source's content (see the module docstring for what that means)."""
    digest = hashlib.sha256(f"cifar-hpo decoded v{CACHE_VERSION} {IMAGE_SIZE}px {kind}\n".encode())
    if kind == "archive":
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    else:
        for rel, size, mtime_ns in _listing(path):
            digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()
