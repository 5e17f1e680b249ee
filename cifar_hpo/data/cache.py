"""The decoded-array cache: ``CACHE_DIR/<name>-<key>.npz``, keyed by the source's content, written atomically."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifar_hpo.data.decode import IMAGE_SIZE, Arrays
from cifar_hpo.data.sources import _listing, cache_home

if TYPE_CHECKING:  # torch is imported lazily: decoding workers must start fast
    pass


CACHE_VERSION = 1  # bump when decoding changes, so old cache files are not used


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
    """
    from cifar_hpo.storage.checkpoint import atomic_write, remove_stale_tmp  # imports torch: decoding workers start without it

    if cache.parent.is_dir():
        remove_stale_tmp(cache.parent)
    train_x, train_y, test_x, test_y, classes = arrays
    atomic_write(
        cache,
        lambda f: np.savez(
            f, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
            classes=np.array(classes, dtype=str), key=np.array(key),
        ),  # fmt: skip
    )


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
