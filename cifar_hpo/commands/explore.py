"""Look at the data before tuning on it: ``cifar-hpo explore --data SOURCE --out DIR``.

Writes into DIR:

- ``samples.png``: ``--per-class`` training images per class, one row per class
  (the original project's ``show5``);
- ``augmentations.png``: the same images augmented at strengths 0, 0.25, 0.5
  and 1.0 (all ops on), one column block per strength;
- ``class_counts.png`` and ``counts.json``: images per class in the train,
  validation and test splits.

The numbers are computed first (``class_counts``, ``sample_indices``), then drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cifar_hpo import data
from cifar_hpo.plots import pyplot as _pyplot  # the one matplotlib setup

STRENGTHS = (0.0, 0.25, 0.5, 1.0)


def main(args: argparse.Namespace) -> int:
    """Write the sample grid, augmentation preview and class counts of ``--data`` into ``--out``."""
    ds = data.load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    split = data.split_dataset(ds, val_fraction=args.val_fraction, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picks = sample_indices(ds.train_y[split.train_idx], len(ds.classes), args.per_class, args.seed)
    images = ds.train_x[split.train_idx][picks]  # (classes, per_class, 32, 32, 3)
    counts = class_counts(ds, split)
    written = [
        draw_samples(images, ds.classes, out / "samples.png"),
        draw_augmentations(images, ds.classes, args.seed, out / "augmentations.png"),
        draw_counts(counts, out / "class_counts.png"),
        _write_json(counts, out / "counts.json"),
    ]
    for path in written:
        print(f"wrote {path}")
    print(
        f"{len(ds.classes)} classes; train {sum(counts['train'].values())}, val {sum(counts['val'].values())}, "
        f"test {sum(counts['test'].values())} images; split {split.hash}"
    )
    return 0


def sample_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Indices (num_classes, k) of k random images per class, k = min(per_class, smallest class size)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    k = min([per_class, *(len(m) for m in members)])
    return np.stack([np.sort(rng.choice(m, size=k, replace=False)) for m in members])


def class_counts(ds: data.Dataset, split: data.Split) -> dict[str, Any]:
    """Images per class and split (train, val, test), as plain data for JSON."""
    result: dict[str, Any] = {"source": ds.source, "classes": list(ds.classes), "split_hash": split.hash}
    for name, labels in (
        ("train", ds.train_y[split.train_idx]),
        ("val", ds.train_y[split.val_idx]),
        ("test", ds.test_y),
    ):
        n = np.bincount(labels, minlength=len(ds.classes))
        result[name] = {cls: int(n[i]) for i, cls in enumerate(ds.classes)}
    return result


def draw_samples(images: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    """Grid of images (rows = classes), class names on the left."""
    plt = _pyplot()
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 1.4, 1.1 * rows + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(classes[r], rotation=0, ha="right", va="center", fontsize=11)
    fig.suptitle(f"{cols} training images per class", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def draw_augmentations(images: np.ndarray, classes: tuple[str, ...], seed: int, path: Path) -> Path:
    """The same images augmented at each of STRENGTHS (all ops on), one column block per strength."""
    import torch  # only this drawing needs torch

    from cifar_hpo.training import augment  # imports torch

    rows, cols = images.shape[:2]
    batch = torch.from_numpy(images.reshape(rows * cols, *images.shape[2:])).permute(0, 3, 1, 2).contiguous()
    blocks = []
    for strength in STRENGTHS:
        g = augment.make_generator("cpu", seed)
        x = augment.augment(batch, strength=strength, ops=augment.OPS, generator=g)
        blocks.append(x.permute(0, 2, 3, 1).reshape(rows, cols, *images.shape[2:]).numpy())
    plt = _pyplot()
    fig = plt.figure(figsize=(0.9 * cols * len(STRENGTHS) + 1.8, 0.9 * rows + 0.9))
    grid = fig.add_gridspec(1, len(STRENGTHS), wspace=0.08)
    for b, (strength, block) in enumerate(zip(STRENGTHS, blocks, strict=True)):
        cells = grid[0, b].subgridspec(rows, cols, wspace=0.04, hspace=0.04)
        for r in range(rows):
            for c in range(cols):
                ax = fig.add_subplot(cells[r, c])
                ax.imshow(block[r, c].clip(0, 1), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and c == cols // 2:
                    ax.set_title(f"strength {strength:g}", fontsize=11)
                if b == 0 and c == 0:
                    ax.set_ylabel(classes[r], rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle("augmentation (translate, flip, rotate, cutout) at several strengths", fontsize=12)
    fig.subplots_adjust(left=1.4 / fig.get_figwidth(), right=0.99, bottom=0.02, top=1 - 0.75 / fig.get_figheight())
    return _save(fig, path)


def draw_counts(counts: dict[str, Any], path: Path) -> Path:
    """Grouped bar chart: images per class in train, val and test."""
    plt = _pyplot()
    classes = counts["classes"]
    splits = ("train", "val", "test")
    x = np.arange(len(classes))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) + 2), 4.2))
    for i, name in enumerate(splits):
        values = [counts[name][c] for c in classes]
        bars = ax.bar(x + (i - 1) * width, values, width, label=f"{name} ({sum(values):,})")
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title(f"images per class and split (split {counts['split_hash']})")
    top = max(max(counts[name].values(), default=0) for name in splits)
    ax.set_ylim(0, top * 1.22 + 1)  # headroom for the legend above the tallest bars
    ax.legend(frameon=False, ncols=3, loc="upper center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def _write_json(counts: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(counts, indent=2) + "\n")
    return path


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
