"""``cifar-hpo train``: train one model outside any study, one line per epoch.

    cifar-hpo train --model fast_cnn --data ../shared/data/cifar10-jpeg.tar.gz --epochs 3
    cifar-hpo train --model mlp --set lr=0.01 --set arch.hidden=512
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cifar_hpo import data
from cifar_hpo.device import resolve_device
from cifar_hpo.errors import UserError
from cifar_hpo.models.registry import build, params_for
from cifar_hpo.storage import checkpoint
from cifar_hpo.training.loop import EpochResult, _to_cpu, train

if TYPE_CHECKING:
    pass


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo train``: train one model outside any study, print one line per epoch."""

    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.subset is not None and args.subset < 20:
        raise UserError(f"--subset must be >= 20 images, got {args.subset}")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    device = resolve_device(args.device)
    params = params_for(args.model, args.set, device)
    ds = data.load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    split = data.split_dataset(ds, val_fraction=args.val_fraction, subset=args.subset)
    dd = data.trial_data(ds, split, device)
    torch.manual_seed(args.seed)
    model = build(params, dd.num_classes)
    print(
        f"{params.model}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
        f"{len(dd.train_y):,} train / {len(dd.eval_y):,} {dd.eval_name} images (split {split.hash})"
    )
    print("params: " + ", ".join(f"{k}={v}" for k, v in params.to_dict().items() if k != "model"))
    print(f"{'epoch':>5}  {'loss':>7}  {'train':>6}  {dd.eval_name + '_acc':>7}  {'lr':>8}  {'img/s':>7}  {'s':>6}")

    def show(r: EpochResult, _snapshot: Callable[[], dict[str, Any]]) -> None:
        print(
            f"{r.epoch:>5}  {r.train_loss:>7.4f}  {r.train_acc:>6.3f}  {r.val_acc:>7.4f}  {r.lr:>8.2e}  "
            f"{r.images_per_s:>7.0f}  {r.seconds:>6.1f}",
            flush=True,
        )

    history = train(model, dd, params, epochs=args.epochs, seed=args.seed, on_epoch=show)
    print(f"status {history.status}; best {dd.eval_name} acc {history.best_val_acc:.4f}; {history.seconds:.1f} s")
    if args.save is not None:
        checkpoint.save(
            {
                "model_state": _to_cpu(model.state_dict()),
                "params": params.to_dict(),
                "classes": list(dd.classes),
                "mean": list(dd.mean),
                "std": list(dd.std),
                "split_hash": dd.split_hash,
                "seed": args.seed,
                "history": history.to_dict(),
            },
            args.save,
        )
        print(f"saved {args.save}")
    return 0 if history.status == "ok" else 1
