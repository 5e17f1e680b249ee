"""Images/s of augmented, normalized batches ready for a model: ours vs the original project's loader.

    cifar-hpo bench data --data ../shared/data/cifar10-jpeg.tar.gz --seconds 10 --json

Ours: ``augment.train_batches`` over ``data.trial_data`` (the 45,000-image
training split resident on the device as uint8), all four ops on at
``--strength`` (default 1.0: shifts up to 4 px, flips, rotations up to 30
degrees, 12 px cutout).

Reference (the original project's approach): a torchvision ``DataLoader`` with
``num_workers=2`` over ``ImageFolder`` (an archive is unpacked to a temporary
folder first; a cifar10 / cifar-10-batches-py source becomes an in-memory
dataset of PIL images, as torchvision's CIFAR10 is), with PIL transforms
RandomRotation(40), RandomHorizontalFlip(), RandomCrop(32, padding=4),
ToTensor(), Normalize(mean, std), the same batch size; each batch is moved to
the device.

Each side runs for ``--seconds`` after a warm-up (ours: 3 batches; reference:
worker start-up and 2 batches per worker), one after the other, so that they
never compete for the CPU. The ratio is ours / reference. Ours uses one torch
thread unless ``--threads`` says otherwise (see ``main``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_hpo import data
from cifar_hpo.bench import emit
from cifar_hpo.device import resolve_device
from cifar_hpo.errors import UserError
from cifar_hpo.training import augment


def main(args: argparse.Namespace) -> int:
    """Measure ours and the reference side by side; print a table (and JSON with --json)."""
    if args.batch_size < 1 or args.seconds <= 0 or not 0.0 <= args.strength <= 1.0:
        raise UserError("bench data: --batch-size must be >= 1, --seconds > 0 and --strength in [0, 1]")
    device = resolve_device(args.device)
    ds = data.load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    split = data.split_dataset(ds)
    dev_data = data.trial_data(ds, split, device)
    ops = augment.OPS
    threads = torch.get_num_threads()
    # One thread by default: our batches are small tensor ops, and on a shared
    # 2-core machine a second OpenMP thread spinning while the other core was
    # busy made ours 5-8x slower. The reference uses 2 worker processes.
    torch.set_num_threads(args.threads or 1)
    try:
        _say(
            f"ours: train_batches on {device}, {len(dev_data.train_y)} images, ops {','.join(ops)}, "
            f"strength {args.strength}, {torch.get_num_threads()} torch thread(s), {args.seconds:g} s"
        )
        result: dict[str, Any] = {
            "device": str(device),
            "batch_size": args.batch_size,
            "strength": args.strength,
            "ops": ",".join(ops),
            "torch_threads": torch.get_num_threads(),
            "seconds": args.seconds,
        }
        result["ours_img_s"] = measure(_ours_batches(dev_data, args.batch_size, args.strength, ops), args.seconds, 3, device)
        with tempfile.TemporaryDirectory(prefix="cifar-hpo-bench-", dir=scratch_dir()) as tmp:
            transform = reference_transform(dev_data.mean, dev_data.std)
            dataset, described = reference_dataset(args.data, args.data_dir, ds, Path(tmp), transform)
            _say(f"reference: DataLoader(num_workers=2) over {described}, {args.seconds:g} s")
            batches = _reference_batches(dataset, args.batch_size, device)
            try:
                result["reference_img_s"] = measure(batches, args.seconds, 4, device)
            finally:
                batches.close()  # shuts the workers down before their folder is deleted
    finally:
        torch.set_num_threads(threads)
    result["ratio"] = result["ours_img_s"] / result["reference_img_s"]
    result["reference"] = (
        "DataLoader(num_workers=2) + PIL RandomRotation(40), RandomHorizontalFlip, "
        f"RandomCrop(32, padding=4), ToTensor, Normalize over {described}"
    )
    emit(result, args.json)
    return 0


def measure(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], seconds: float, warmup: int, device: torch.device) -> float:
    """Images/s drawn from ``batches`` over ``seconds``, after ``warmup`` batches."""
    for _ in range(warmup):
        next(batches)
    _sync(device)
    images = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(batches)
        images += x.shape[0]
    _sync(device)
    return images / (time.perf_counter() - start)


def reference_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    """The original project's PIL transforms (rotation first, normalization last)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomRotation(40), T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor(), T.Normalize(mean, std)])


def reference_dataset(
    source: str, data_dir: Path | None, ds: data.Dataset, tmp: Path, transform: Callable[[Any], torch.Tensor]
) -> tuple[torch.utils.data.Dataset, str]:
    """The reference's training dataset of PIL images with ``transform``, and a description of it."""
    from torchvision.datasets import ImageFolder

    kind, path = data.resolve_source(source, data_dir)
    if kind == "archive":
        _say(f"unpacking {path} into {tmp} for ImageFolder")
        unpack(path, tmp)
        root = data.find_split_root(tmp)
        described = f"ImageFolder of {path.name} unpacked (JPEG files decoded per image)"
        return ImageFolder(str(root / "train"), transform=transform), described
    if kind == "folder":
        return ImageFolder(str(path / "train"), transform=transform), f"ImageFolder {path}"
    return _ArrayImages(ds.train_x, ds.train_y, transform), "in-memory PIL images (as torchvision CIFAR10)"


def unpack(archive: Path, dest: Path) -> None:
    """Write the regular files of a tar archive under ``dest``; links and paths leaving ``dest`` are skipped.

    Plain writes: tarfile.extractall (which also sets owners, modes and times)
    took 62 s for the 55,000 files here, this takes 3 s on tmpfs.
    """
    made: set[str] = set()
    with tarfile.open(archive) as tf:
        for member in tf:
            name = os.path.normpath(member.name)
            if not member.isfile() or os.path.isabs(name) or name.split(os.sep)[0] == "..":
                continue
            target = os.path.join(dest, name)
            folder = os.path.dirname(target)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            f = tf.extractfile(member)
            with open(target, "wb") as out:
                out.write(f.read() if f is not None else b"")


def scratch_dir() -> str | None:
    """/dev/shm (memory) when it has room for an unpacked archive, else the default temp folder."""
    shm = "/dev/shm"
    try:
        return shm if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30 else None
    except OSError:
        return None


class _ArrayImages(torch.utils.data.Dataset):
    """uint8 HWC arrays served as (PIL image, label), like torchvision's CIFAR10."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.x[i])
        return self.transform(image), int(self.y[i])


def _ours_batches(
    dev_data: data.DeviceData, batch_size: int, strength: float, ops: tuple[str, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = augment.make_generator(dev_data.device, 0)
    while True:
        yield from augment.train_batches(dev_data, batch_size, strength=strength, ops=ops, generator=g)


def _reference_batches(
    dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
        pin_memory=device.type == "cuda",
    )
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
