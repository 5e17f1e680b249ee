"""Decoding: image folders, tar archives and the official python batches -> uint8 arrays.

Every image is converted to RGB; images that are not 32x32 are resized to 32x32
(squashed, bicubic with PIL's antialiasing). Large jobs decode in worker
processes. The official batches are unpickled with an allow-list of globals.
"""

from __future__ import annotations

import io
import multiprocessing
import pickle
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_hpo.data.sources import BATCH_FILES, _hidden, _listing
from cifar_hpo.device import cpu_threads
from cifar_hpo.errors import UserError, first_line

if TYPE_CHECKING:  # torch is imported lazily: decoding workers must start fast; PIL only where images are decoded
    from PIL import Image


IMAGE_SIZE = 32  # pixels, height = width


INPUT_SIZE = (3, IMAGE_SIZE, IMAGE_SIZE)  # (channels, height, width) of every decoded image: what every model takes


MAX_ARCHIVE_BYTES = 4 << 30  # members of one archive are held in memory at once: a bomb is refused before it is read


# One-channel modes of 16 bits (PNG, TIFF; PGM of any depth is scaled to 0..65535 by PIL): PIL's convert clips them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


PARALLEL_MIN_IMAGES = 4000  # below this, starting worker processes costs more than it saves


PROGRESS_EVERY_S = 2.0


PROGRESS_MIN_IMAGES = 2000  # smaller jobs take well under a second: no progress lines


# Decoded arrays: train_x, train_y, test_x, test_y, classes.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]


# An item to decode: (name shown in errors, payload); the payload is the file's
# bytes (archive members) or its path (folder files, read by the worker).
Item = tuple[str, "bytes | Path"]


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
    total = 0
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                name = m.name.removeprefix("./").strip("/")
                if not name or any(_hidden(p) for p in name.split("/")):
                    continue
                if m.isdir():
                    members.append((name, None))
                elif m.isfile():
                    total += m.size  # the header's size, known before a byte of the member is read
                    if total > MAX_ARCHIVE_BYTES:
                        raise UserError(
                            f"archive {path} holds more than {MAX_ARCHIVE_BYTES / 2**30:g} GiB of files (its member {name} "
                            f"brings them to {total / 2**30:.1f} GiB), more than is read into memory; unpack it and pass the folder"
                        )
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
            rgb = to_rgb(im)  # forces the full decode, so truncation raises here
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
        raise UserError(f"{name} is not a readable image ({type(e).__name__}: {first_line(e)}); delete or replace that file") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; 16-bit grey images scaled to 8 bits (v / 257, rounded), where PIL's convert would clip at 255.

    ``convert("RGB")`` of a 16-bit image keeps min(v, 255): a 16-bit PNG decodes almost white. 65535 / 257 = 255
    exactly, and an 8-bit value k stored as 16 bits (k * 257) comes back as k.
    """
    from PIL import Image

    if im.mode not in SIXTEEN_BIT_MODES:
        return im.convert("RGB")
    v = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # mode "I" is int32: clip before scaling
    return Image.fromarray(((v + 128) // 257).astype(np.uint8), "L").convert("RGB")


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
