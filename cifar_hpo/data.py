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

import hashlib
import io
import multiprocessing
import os
import pickle
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_hpo.device import cpu_threads
from cifar_hpo.errors import UserError, first_line

if TYPE_CHECKING:  # torch is imported lazily: decoding workers must start fast
    import torch

IMAGE_SIZE = 32  # pixels, height = width
CACHE_VERSION = 1  # bump when decoding changes, so old cache files are not used
BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
BATCHES_FOLDER = "cifar-10-batches-py"
PARALLEL_MIN_IMAGES = 4000  # below this, starting worker processes costs more than it saves
PROGRESS_EVERY_S = 2.0
PROGRESS_MIN_IMAGES = 2000  # smaller jobs take well under a second: no progress lines

# Decoded arrays: train_x, train_y, test_x, test_y, classes.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]
# An item to decode: (name shown in errors, payload); the payload is the file's
# bytes (archive members) or its path (folder files, read by the worker).
Item = tuple[str, "bytes | Path"]


@dataclass(frozen=True)
class Dataset:
    """Decoded images of one source, train and test, in memory.

    Attributes:
        train_x: uint8 (N, 32, 32, 3), HWC, RGB.
        train_y: int64 (N,), indices into ``classes``.
        test_x: uint8 (M, 32, 32, 3); only final evaluation reads it.
        test_y: int64 (M,).
        classes: class names in label order, taken from the data.
        source: what the user passed as ``--data``.
        key: sha256 hex of the source's content (the cache key).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str
    key: str


@dataclass(frozen=True)
class Split:
    """A seeded, stratified train/validation split of ``Dataset.train_*``.

    Attributes:
        train_idx: int64 indices into ``Dataset.train_*``, sorted.
        val_idx: int64 indices into ``Dataset.train_*``, sorted, disjoint from train_idx.
        seed: seed of the split.
        val_fraction: share of the (subset of the) train images held out.
        subset: number of train images drawn before splitting, or None for all.
        hash: 16 hex digits of sha256(dataset key, indices): equal hashes mean
            the same images in the same roles.
    """

    train_idx: np.ndarray
    val_idx: np.ndarray
    seed: int
    val_fraction: float
    subset: int | None
    hash: str


@dataclass(frozen=True)
class DeviceData:
    """Images resident on the training device as uint8 NCHW tensors.

    Attributes:
        train_x: uint8 (N, 3, H, W) on the device.
        train_y: int64 (N,) on the device.
        eval_x: validation images during a study, test images in final evaluation.
        eval_y: their labels.
        eval_name: "val" or "test".
        classes: class names in label order.
        mean: per-channel mean of train_x, in [0, 1] units.
        std: per-channel standard deviation of train_x, in [0, 1] units.
        split_hash: ``Split.hash`` of the split these tensors came from.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_name: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split_hash: str

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self.train_x.device


# ---------------------------------------------------------------- public API


def load_dataset(
    source: str,
    *,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Dataset:
    """Load a source's train and test images, decoding them only on the first call.

    Args:
        source: ``"cifar10"``, an ImageFolder folder, a ``.tar``/``.tar.gz`` of
            one, or a ``cifar-10-batches-py`` folder.
        data_dir: where ``cifar10`` is downloaded (default: ``CACHE_HOME/data``).
        cache_dir: folder of decoded arrays (default: ``CACHE_HOME/decoded``),
            where CACHE_HOME is ``$CIFAR_HPO_CACHE`` or ``~/.cache/cifar-hpo``.
        progress: print progress of long work (download, decoding) to stderr.

    Returns:
        The decoded dataset.

    Raises:
        UserError: the source is missing, not in a known layout, or holds a
            file that is not a readable image; the message names it and the fix.
    """
    if source is None or not str(source).strip():
        raise UserError("no data source given; pass --data cifar10, an ImageFolder folder or a .tar.gz of one")
    source = str(source)
    kind, path = resolve_source(source, data_dir, progress)
    key = _source_key(kind, path)
    cache = _cache_file(cache_dir, path, key)
    cached = _read_cache(cache, key)
    if cached is not None:
        return _dataset(cached, source, key)
    if kind == "batches":
        arrays = _load_batches(path)
    elif kind == "archive":
        arrays = _decode_archive(path, progress)
    else:
        arrays = _decode_folder(path, progress)
    _write_cache(cache, key, arrays)
    return _dataset(arrays, source, key)


def _dataset(arrays: Arrays, source: str, key: str) -> Dataset:
    train_x, train_y, test_x, test_y, classes = arrays
    return Dataset(train_x, train_y, test_x, test_y, classes, source, key)


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


def split_dataset(ds: Dataset, *, val_fraction: float = 0.1, seed: int = 42, subset: int | None = None) -> Split:
    """Split the train images into train and validation, stratified by class.

    Args:
        ds: the dataset.
        val_fraction: share of the images held out for validation, in (0, 1).
        seed: seed of the split (numpy ``default_rng``).
        subset: first draw a stratified subset of this many train images, then
            split it (for quick studies).

    Returns:
        The split; per class, the validation share is within one image of
        ``val_fraction`` (largest-remainder rounding, exact in total).

    Raises:
        UserError: val_fraction outside (0, 1), subset outside 1..N, or a split
            that leaves train or validation empty.
    """
    n = len(ds.train_y)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. --val-fraction 0.1")
    rng = np.random.default_rng(seed)
    pool = np.arange(n, dtype=np.int64)
    if subset is not None:
        if not 1 <= subset <= n:
            raise UserError(f"--subset {subset}: the data has {n} training images; pass 1..{n}")
        pool = _stratified_take(ds.train_y, pool, subset, rng)
    val_idx = _stratified_take(ds.train_y, pool, round(len(pool) * val_fraction), rng)
    train_idx = np.setdiff1d(pool, val_idx, assume_unique=True)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise UserError(
            f"splitting {len(pool)} images with val_fraction {val_fraction} leaves an empty "
            f"{'validation' if len(val_idx) == 0 else 'training'} set; use more images or another --val-fraction"
        )
    digest = hashlib.sha256(ds.key.encode())
    for idx in (train_idx, val_idx):
        digest.update(b"|" + idx.astype("<i8").tobytes())
    return Split(train_idx, val_idx, seed, val_fraction, subset, digest.hexdigest()[:16])


def trial_data(ds: Dataset, split: Split, device: torch.device) -> DeviceData:
    """Training and validation images of a split on ``device``; never reads the test split."""
    return _to_device(
        ds.train_x[split.train_idx],
        ds.train_y[split.train_idx],
        ds.train_x[split.val_idx],
        ds.train_y[split.val_idx],
        "val",
        ds.classes,
        split.hash,
        device,
    )


def final_data(ds: Dataset, split: Split, device: torch.device) -> DeviceData:
    """Training plus validation images (for the final model) and the test split on ``device``."""
    idx = np.sort(np.concatenate([split.train_idx, split.val_idx]))
    return _to_device(ds.train_x[idx], ds.train_y[idx], ds.test_x, ds.test_y, "test", ds.classes, split.hash, device)


def study_data(
    source: str,
    *,
    subset: int | None,
    val_fraction: float,
    split_seed: int,
    device: str = "auto",
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    final: bool = False,
) -> DeviceData:
    """The images a study sees, on the training device: what ``run`` and ``retrain`` train on.

    Decodes (or reads from the cache) ``source``, splits it with the study's
    ``subset``, ``val_fraction`` and ``split_seed``, and puts it on ``device``
    (``auto``, ``cpu``, ``cuda[:N]``). Trials get train / validation
    (`trial_data`); ``final=True`` gives train + validation / test
    (`final_data`), for the final evaluation only.
    """
    from cifar_hpo.device import resolve_device

    on = resolve_device(device)
    ds = load_dataset(source, data_dir=data_dir, cache_dir=cache_dir)
    split = split_dataset(ds, val_fraction=val_fraction, seed=split_seed, subset=subset)
    return (final_data if final else trial_data)(ds, split, on)


# ---------------------------------------------------------------- sources


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


# ---------------------------------------------------------------- cache


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


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """Sorted (relative path, size, mtime_ns) of every non-hidden file under ``root``."""
    rows = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in files:
            if _hidden(name):
                continue
            path = os.path.join(folder, name)
            st = os.stat(path)
            rows.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    rows.sort()
    return rows


def _hidden(name: str) -> bool:
    # Dot files (.DS_Store, AppleDouble ._x.jpg) and macOS archive debris are not data.
    return name.startswith(".") or name == "__MACOSX"


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
    from cifar_hpo.checkpoint import atomic_write, remove_stale_tmp

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


# ---------------------------------------------------------------- ImageFolder folders and archives


def _decode_folder(root: Path, progress: bool) -> Arrays:
    classes = _shared_classes(
        {split: _subfolders(root / split) for split in ("train", "test")},
        where=str(root),
    )
    items: dict[str, list[tuple[int, Item]]] = {"train": [], "test": []}
    for split, rows in items.items():
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            files = [row[0] for row in _listing(folder)]
            if not files:
                raise UserError(f"class folder {folder} holds no images; add images or remove the class from train/ and test/")
            rows.extend((ci, (str(folder / rel), folder / rel)) for rel in files)
    return _decode_splits(items, classes, progress, what=str(root))


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _shared_classes(found: Mapping[str, Iterable[str]], where: str) -> tuple[str, ...]:
    """Return the sorted class names, which train and test must share."""
    train, test = set(found["train"]), set(found["test"])
    if not train:
        raise UserError(f"{where}/train holds no class folders; expected {where}/train/<class>/<image>")
    if train != test:
        parts = []
        if train - test:
            parts.append(f"only in train: {', '.join(sorted(train - test))}")
        if test - train:
            parts.append(f"only in test: {', '.join(sorted(test - train))}")
        raise UserError(f"train/ and test/ of {where} have different classes ({'; '.join(parts)}); give both the same class folders")
    return tuple(sorted(train))


def _decode_archive(path: Path, progress: bool) -> Arrays:
    if progress and path.stat().st_size > 8 << 20:  # reading 18 MB of tar.gz takes ~2 s
        print(f"reading {path}", file=sys.stderr, flush=True)
    members = _read_archive(path)
    root = _archive_root(path, members)
    prefix = f"{root}/" if root else ""
    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for name, data in members:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        # A class is a folder below train/ or test/: seen as a folder member or in a file's path.
        is_class = len(parts) >= 3 or (len(parts) == 2 and data is None)
        if not is_class or parts[0] not in found or _hidden(parts[1]):
            continue
        files = found[parts[0]].setdefault(parts[1], [])
        if data is not None and len(parts) >= 3:
            files.append(("/".join(parts[2:]), data))
    where = f"{path}:{root}" if root else str(path)
    classes = _shared_classes(found, where)
    items: dict[str, list[tuple[int, Item]]] = {"train": [], "test": []}
    for split, rows in items.items():
        for ci, cls in enumerate(classes):
            files = sorted(found[split][cls])
            if not files:
                raise UserError(
                    f"class folder {prefix}{split}/{cls} in {path} holds no images; add images or remove the class from train/ and test/"
                )
            rows.extend((ci, (f"{path}:{prefix}{split}/{cls}/{rel}", data)) for rel, data in files)
    return _decode_splits(items, classes, progress, what=str(path))


def _read_archive(path: Path) -> list[tuple[str, bytes | None]]:
    """(name, bytes) of every member; None for folders. Hidden files and links are skipped."""
    members: list[tuple[str, bytes | None]] = []
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                name = m.name.removeprefix("./").strip("/")
                if not name or any(_hidden(p) for p in name.split("/")):
                    continue
                if m.isdir():
                    members.append((name, None))
                elif m.isfile():
                    f = tf.extractfile(m)
                    members.append((name, f.read() if f is not None else b""))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"archive {path} is damaged ({type(e).__name__}: {first_line(e)}); create or download it again") from None
    return members


def _archive_root(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """The member folder holding train/ and test/ (e.g. "cifar10-jpeg"), "" for the top."""
    seen: dict[str, set[str]] = {}
    for name, _ in members:
        parts = name.split("/")
        for i, part in enumerate(parts[:-1]):
            if part in ("train", "test"):
                seen.setdefault("/".join(parts[:i]), set()).add(part)
    roots = sorted((r for r, splits in seen.items() if splits == {"train", "test"}), key=lambda r: (r.count("/"), r))
    if not roots:
        raise UserError(
            f"archive {path} has no folder holding both train/ and test/; expected the ImageFolder layout "
            "ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"
        )
    return roots[0]


def _decode_splits(items: dict[str, list[tuple[int, Item]]], classes: tuple[str, ...], progress: bool, what: str) -> Arrays:
    """Decode train then test items into uint8 arrays and int64 labels."""
    flat = [item for split in ("train", "test") for _, item in items[split]]
    images = _decode_all(flat, progress, what)
    n_train = len(items["train"])
    labels = {split: np.array([ci for ci, _ in items[split]], dtype=np.int64) for split in items}
    return images[:n_train], labels["train"], images[n_train:], labels["test"], classes


def _decode_all(items: list[Item], progress: bool, what: str) -> np.ndarray:
    """Decode items into one (N, 32, 32, 3) uint8 array, over all cores when there are many."""
    out = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    report = _progress(len(items), f"images of {what}", progress)
    # One core stays with the parent, which reads the files and collects results.
    # On 2 cores, 2 worker processes were slower than none (30,000 JPEGs: 4.2 s
    # vs 2.8-3.5 s): the parent's reading and pickling compete for the same cores.
    workers = min(cpu_threads() - 1, 8)
    if workers < 3 or len(items) < PARALLEL_MIN_IMAGES:
        for start in range(0, len(items), 500):
            out[start : start + 500] = _decode_chunk(items[start : start + 500])
            report(min(start + 500, len(items)))
        return out
    # Chunks of ~1,000 images: enough to amortize the hand-off between processes,
    # small enough for frequent progress lines. spawn, not fork: the parent may
    # already run torch's thread pools, which a fork would copy in a broken state.
    chunk = 1000
    starts = range(0, len(items), chunk)
    done = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_decode_chunk, items[s : s + chunk]) for s in starts]
        try:
            for s, future in zip(starts, futures, strict=True):
                out[s : s + chunk] = future.result()
                done += min(chunk, len(items) - s)
                report(done)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out


def _decode_chunk(items: list[Item]) -> np.ndarray:
    """Decode a list of items (runs in worker processes)."""
    out = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (name, payload) in enumerate(items):
        out[i] = decode_image(name, payload)
    return out


def decode_image(name: str, payload: bytes | Path) -> np.ndarray:
    """Decode one image file (bytes or path) to uint8 (32, 32, 3) RGB.

    Images of another size are resized to 32x32 (squashed, bicubic with antialiasing).

    Raises:
        UserError: the file is not an image or is truncated; ``name`` is named.
    """
    from PIL import Image

    try:
        data = payload.read_bytes() if isinstance(payload, Path) else payload
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")  # forces the full decode, so truncation raises here
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
        raise UserError(f"{name} is not a readable image ({type(e).__name__}: {first_line(e)}); delete or replace that file") from None


# ---------------------------------------------------------------- cifar-10-batches-py


def _load_batches(folder: Path) -> Arrays:
    missing = [name for name in (*BATCH_FILES, "batches.meta") if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"folder {folder} lacks {', '.join(missing)}: not a complete cifar-10-batches-py folder; "
            "download CIFAR-10 again (--data cifar10) or pass another folder"
        )
    meta = _unpickle(folder / "batches.meta")
    names = _field(meta, "label_names", folder / "batches.meta")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    xs, ys = [], []
    for name in BATCH_FILES:
        path = folder / name
        entry = _unpickle(path)
        data = np.asarray(_field(entry, "data", path))
        labels = np.asarray(_field(entry, "labels", path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
            raise UserError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); replace the file")
        if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(classes)):
            raise UserError(f"{path}: labels do not match the data or batches.meta; replace the file")
        # Rows are 1024 red, 1024 green, then 1024 blue values: CHW -> HWC.
        xs.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
        ys.append(labels)
    train_x = np.ascontiguousarray(np.concatenate(xs[:-1]))
    return train_x, np.concatenate(ys[:-1]), np.ascontiguousarray(xs[-1]), ys[-1], classes


# Only what pickled numpy arrays need: unpickling any other global could run code.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batch files that refuses every global but numpy's array rebuilders."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 moved numpy.core
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            # latin1: the official files are Python 2 pickles of str keys and bytes.
            return _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise UserError(
            f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {first_line(e)}); "
            "download CIFAR-10 again (--data cifar10) or replace the file"
        ) from None


def _field(entry: Any, key: str, path: Path) -> Any:
    if isinstance(entry, dict):
        for k in (key, key.encode()):
            if k in entry:
                return entry[k]
    raise UserError(f"{path} has no '{key}' entry; it is not a CIFAR-10 batch file: replace it")


# ---------------------------------------------------------------- device


def _to_device(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    eval_name: str,
    classes: tuple[str, ...],
    split_hash: str,
    device: torch.device,
) -> DeviceData:
    import torch

    mean, std = channel_stats(train_x)

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(device)

    return DeviceData(images(train_x), labels(train_y), images(eval_x), labels(eval_y), eval_name, classes, mean, std, split_hash)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 HWC images, in [0, 1] units.

    Exact, from a 256-bin histogram per channel (no float copy of the images).
    The std is at least 1/255, so that normalizing constant images stays finite.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(3):
        counts = np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64)
        total = max(counts.sum(), 1.0)
        mean = float(counts @ values / total)
        var = float(counts @ values**2 / total) - mean**2
        means.append(mean)
        stds.append(max(float(np.sqrt(max(var, 0.0))), 1.0 / 255.0))
    return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


# ---------------------------------------------------------------- helpers


def _stratified_take(y: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` of ``pool`` with each class's share kept (largest-remainder rounding); sorted."""
    labels = y[pool]
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / max(len(pool), 1))
    quota = np.floor(exact).astype(np.int64)
    # Hand the images lost to rounding to the classes with the largest remainders
    # (ties to the larger class, then the lower label), so the total is exactly n.
    order = np.lexsort((classes, -counts, -(exact - quota)))
    quota[order[: n - int(quota.sum())]] += 1
    taken = [rng.permutation(pool[labels == c])[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(taken)) if taken else np.empty(0, dtype=np.int64)


def _progress(total: int, what: str, enabled: bool) -> Callable[[int], None]:
    """A callback printing "decoding DONE/TOTAL WHAT" on stderr at most every PROGRESS_EVERY_S seconds.

    It prints a first line at once and a last one when DONE reaches TOTAL; jobs
    under PROGRESS_MIN_IMAGES images stay silent.
    """
    enabled = enabled and total >= PROGRESS_MIN_IMAGES
    started = last = time.perf_counter()
    if enabled:
        print(f"decoding {total} {what} (once: cached afterwards)", file=sys.stderr, flush=True)

    def report(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if enabled and done >= total:
            print(f"decoded {total} images in {now - started:.1f} s", file=sys.stderr, flush=True)
        elif enabled and now - last >= PROGRESS_EVERY_S:
            print(f"decoding {done}/{total} {what}", file=sys.stderr, flush=True)
            last = now

    return report
