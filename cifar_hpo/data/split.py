"""Datasets, the stratified split, and tensors on the device.

    ds = load_dataset("../shared/data/cifar10-jpeg.tar.gz")   # ~4 s the first time, ~0.2 s after
    split = split_dataset(ds, val_fraction=0.1, seed=42)       # 45,000 / 5,000, stratified
    data = trial_data(ds, split, torch.device("cuda"))         # train + validation, never test
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifar_hpo.data.cache import _cache_file, _read_cache, _source_key, _write_cache
from cifar_hpo.data.decode import Arrays, _decode_archive, _decode_folder, _load_batches
from cifar_hpo.data.sources import resolve_source
from cifar_hpo.device import resolve_device
from cifar_hpo.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily: decoding workers must start fast
    import torch


MIN_SUBSET = 20  # the fewest training images --subset may draw (study files and `train` hold the same bound)


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
        UserError: val_fraction outside (0, 1), subset outside MIN_SUBSET..N, or a split
            that leaves train or validation empty.
    """
    n = len(ds.train_y)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. --val-fraction 0.1")
    rng = np.random.default_rng(seed)
    pool = np.arange(n, dtype=np.int64)
    if subset is not None:
        if n < MIN_SUBSET:
            raise UserError(f"--subset {subset}: the data has only {n} training images, a subset needs {MIN_SUBSET}; drop --subset")
        if not MIN_SUBSET <= subset <= n:
            raise UserError(f"--subset {subset}: the data has {n} training images; pass {MIN_SUBSET}..{n}")
        pool = stratified_take(ds.train_y, pool, subset, rng)
    val_idx = stratified_take(ds.train_y, pool, round(len(pool) * val_fraction), rng)
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
    on = resolve_device(device)
    ds = load_dataset(source, data_dir=data_dir, cache_dir=cache_dir)
    split = split_dataset(ds, val_fraction=val_fraction, seed=split_seed, subset=subset)
    return (final_data if final else trial_data)(ds, split, on)


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


def stratified_take(y: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
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
