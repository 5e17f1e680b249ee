"""Data: a source -> decoded uint8 arrays (cached) -> stratified split -> tensors on the device.

    ds = load_dataset("../shared/data/cifar10-jpeg.tar.gz")   # ~4 s the first time, ~0.2 s after
    split = split_dataset(ds, val_fraction=0.1, seed=42)       # 45,000 / 5,000, stratified
    data = trial_data(ds, split, torch.device("cuda"))         # train + validation, never test

Sources (``--data``):

- ``cifar10``: the official CIFAR-10 python batches, downloaded by torchvision
  into ``data_dir`` (default ``$CIFAR_HPO_CACHE/data`` or ``~/.cache/cifar-hpo/data``).
- a folder in ImageFolder layout, ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``
  (ROOT may also be one level below the folder given, as after unpacking an archive);
- a ``.tar`` / ``.tar.gz`` of such a folder (read straight from the archive);
- an official ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``), or a folder holding one.

Class names and their number come from the data: sorted class-folder names, or
``label_names`` of ``batches.meta``. Every image is converted to RGB; images that
are not 32x32 are resized to 32x32 (squashed, aspect ratio not kept, bicubic with
PIL's antialiasing), so that every source gives the same array shape.

Cache: the decoded arrays are written once to ``CACHE_DIR/<name>-<key>.npz``
(uncompressed, so a load is a plain read: ~0.2 s for 55,000 images) with an atomic
write (temp file, fsync, ``os.replace``). The key is a sha256 of the source's
content, computed on every load:

- an archive file: the sha256 of its bytes (17.8 MB hash in ~20 ms). Size, mtime
  and path are not content: a copy hits the cache, an edit in place misses it.
- a folder: the sha256 of the sorted list of (relative path, size, mtime_ns) of
  every file under it. Hashing the bytes of 55,000 small files would cost more than
  the load it guards; the listing changes whenever a file is added, removed,
  renamed or rewritten (a rewrite bumps mtime).

A changed source gets a new key, so it is decoded again; stale cache files are
left in place (delete the cache folder to reclaim the space). A cache file that
cannot be read is treated as missing.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from cifar_hpo.errors import UserError, first_line

if TYPE_CHECKING:  # torch is imported lazily: decoding workers must start fast
    pass


BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


BATCHES_FOLDER = "cifar-10-batches-py"


def cache_home() -> Path:
    """``$CIFAR_HPO_CACHE`` or ``~/.cache/cifar-hpo``: parent of ``data/`` and ``decoded/``."""
    return Path(os.environ.get("CIFAR_HPO_CACHE") or Path.home() / ".cache" / "cifar-hpo").expanduser()


def resolve_source(source: str, data_dir: Path | None = None, progress: bool = True) -> tuple[str, Path]:
    """Say what a ``--data`` value is, downloading ``cifar10`` if needed.

    Returns:
        (kind, path): kind "batches" (a cifar-10-batches-py folder), "archive"
        (a tar file) or "folder" (the folder holding train/ and test/).

    Raises:
        UserError: the path is missing, not a tar archive, or a folder in no known layout.
    """
    if source.strip().lower() == "cifar10":
        folder = Path(data_dir).expanduser() if data_dir is not None else cache_home() / "data"
        return "batches", _ensure_cifar10(folder, progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data source {path} does not exist; pass --data cifar10, an ImageFolder folder or a .tar.gz of one")
    if path.is_file():
        if not _is_tar(path):
            raise UserError(
                f"{path} is not a tar archive (or is damaged); pass a .tar/.tar.gz of an ImageFolder tree, a folder, or cifar10"
            )
        return "archive", path.resolve()
    for folder in (path, path / BATCHES_FOLDER):
        if (folder / "batches.meta").exists() or (folder / "data_batch_1").exists():
            return "batches", folder.resolve()
    return "folder", find_split_root(path).resolve()


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error):
        return False


def _ensure_cifar10(data_dir: Path, progress: bool) -> Path:
    """Return ``data_dir/cifar-10-batches-py``, downloading it with torchvision when absent."""
    folder = data_dir / BATCHES_FOLDER
    if all((folder / name).is_file() for name in (*BATCH_FILES, "batches.meta")):
        return folder
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    if progress:
        print(f"downloading CIFAR-10 (163 MB) from {CIFAR10.url} into {data_dir}", file=sys.stderr, flush=True)
    try:
        # Verifies the archive's md5 before unpacking it.
        download_and_extract_archive(CIFAR10.url, str(data_dir), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as e:  # network, disk and checksum errors all mean the same to the user
        raise UserError(
            f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {first_line(e)}); connect to the "
            f"internet, or unpack {CIFAR10.filename} there yourself, or pass --data with an ImageFolder folder "
            "or .tar.gz (e.g. ../shared/data/cifar10-jpeg.tar.gz)"
        ) from None
    return folder


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """Sorted (relative path, size, mtime_ns) of every non-hidden file under ``root``; links are followed.

    Raises:
        UserError: a broken link, a link loop (a link to a folder above it), or something that is not a
            file (a FIFO, a device: reading it would block or never end); the path is named.
    """
    rows = []
    # (folder, (device, inode) of the folders from root down to it): a folder met again below itself is a loop.
    stack: list[tuple[str, frozenset[tuple[int, int]]]] = [(str(root), frozenset())]
    while stack:
        folder, above = stack.pop()
        st = _stat(folder)
        if (st.st_dev, st.st_ino) in above:
            raise UserError(f"{folder} is a link to a folder above it (a loop); remove the link or point it elsewhere")
        above = above | {(st.st_dev, st.st_ino)}
        try:
            names = os.listdir(folder)
        except OSError as e:
            raise UserError(f"cannot list the folder {folder}: {e.strerror}; fix its permissions or remove it") from None
        for name in names:
            if _hidden(name):
                continue
            path = os.path.join(folder, name)
            st = _stat(path)
            if stat.S_ISDIR(st.st_mode):
                stack.append((path, above))
            elif stat.S_ISREG(st.st_mode):
                rows.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
            else:
                raise UserError(f"{path} is not a regular file (a FIFO, socket or device); remove it from the data folder")
    rows.sort()
    return rows


def _stat(path: str) -> os.stat_result:
    """``os.stat`` (links followed); a broken link or a link loop is a UserError naming it."""
    try:
        return os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {link_problem(Path(path)) or e.strerror}; remove it or fix it") from None


def link_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a symbolic link (broken, or a loop), in words for an error message; None if nothing."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except FileNotFoundError:
        return f"a broken symbolic link (to {os.readlink(path)!r}, which does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (the link leads back to itself)"
        return None
    return None


def _hidden(name: str) -> bool:
    # Dot files (.DS_Store, AppleDouble ._x.jpg) and macOS archive debris are not data.
    return name.startswith(".") or name == "__MACOSX"


def find_split_root(folder: Path) -> Path:
    """Return the folder holding ``train/`` and ``test/``: ``folder`` or one of its subfolders.

    Raises:
        UserError: neither ``folder`` nor exactly one subfolder holds both.
    """
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return folder
    found = [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "train").is_dir() and (p / "test").is_dir()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"folder {folder} holds several datasets ({names}); pass the one to use as --data")
    missing = " and ".join(s for s in ("train", "test") if not (folder / s).is_dir())
    raise UserError(
        f"folder {folder} has no {missing}/ subfolder; expected the ImageFolder layout "
        f"{folder}/train/<class>/<image> and {folder}/test/<class>/<image>"
    )
