"""``cifar-hpo bench time-to-accuracy``: wall time until fast_cnn reaches a test accuracy.

    cifar-hpo bench time-to-accuracy --data ../shared/data/cifar10-jpeg.tar.gz --target 0.94 --seeds 3 --json

A benchmark of the fast_cnn recipe (`models.default_params`), not tuning: it
trains on the full training set (train + validation, `data.final_data`) and
evaluates on the test split after every epoch, stopping at the first epoch
whose test accuracy reaches ``--target``. Using the test split is fine here
because nothing is chosen from it. The dataset is decoded (or read from the
decode cache) before the clock starts; the clock covers moving the images to
the device, building and initialising the model, training and the per-epoch
evaluations. The last epoch is evaluated as the model is used (fast_cnn's
test-time augmentation: 6 passes per image); the epochs before it with one
pass, like airbench's per-epoch figures, so watching costs ~2 s per epoch
instead of ~12 on a CPU (a run that reaches the target early still stops there).
After the clock stops, the last model is also evaluated at each test-time
augmentation level (``test_acc_by_tta``: 0 none, 1 mirror, 2 mirror + translate).

Without ``--epochs`` the schedule is the shortest of `LADDER` planned for the
target; the lowest rung also swaps in the light network (`LIGHT_ARCH`). With
``--seeds N`` the same run is repeated for seeds seed..seed+N-1, one after the
other, and the figures are means (each seed's beside them).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from cifar_hpo import data, models
from cifar_hpo.bench import emit
from cifar_hpo.device import cpu_threads, resolve_device
from cifar_hpo.errors import UserError
from cifar_hpo.training import EpochResult, StopTraining, evaluate, train

# fast_cnn's light network: half width, stride-2 whitening stem (a quarter of the pixels
# after the stem): ~16x fewer FLOPs than the full network, ~73% test after 2 CPU epochs.
LIGHT_ARCH = {"width": 0.5, "stem_stride": 2}
# (highest target the schedule is planned for, epochs, light network?) per device type,
# measured with this command over 3 seeds (README's time-to-accuracy table).
LADDER: dict[str, list[tuple[float, int, bool]]] = {
    "cpu": [(0.70, 2, True), (0.90, 10, False), (0.94, 16, False)],
    "cuda": [(0.94, 10, False)],
}


def plan(device_type: str, target: float) -> tuple[int, bool]:
    """Epochs and whether to use `LIGHT_ARCH` for ``target`` (the last rung beyond the ladder)."""
    rungs = LADDER.get(device_type, LADDER["cuda"])
    for top, epochs, light in rungs:
        if target <= top + 1e-9:
            return epochs, light
    return rungs[-1][1], rungs[-1][2]


def main(args: argparse.Namespace) -> int:
    """Train fast_cnn until --target test accuracy; print seconds and accuracy (exit 1 if a seed missed it)."""
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    device = resolve_device(args.device)
    epochs, light = plan(device.type, args.target)
    overrides = list(args.set)
    if light and args.epochs is None:
        overrides = [f"arch.{k}={v}" for k, v in LIGHT_ARCH.items()] + overrides  # --set still wins
    params = models.params_for("fast_cnn", overrides, device)
    epochs = args.epochs or epochs
    ds = data.load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    split = data.split_dataset(ds)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())

    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        if args.seeds > 1:
            print(f"seed {seed} ({seed - args.seed + 1}/{args.seeds})", flush=True)
        runs.append(_one_run(ds, split, params, device, epochs, seed, args.target))
    first = runs[0]
    result: dict[str, Any] = {
        "target": args.target,
        "reached": all(r["reached"] for r in runs),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
        "test_acc": statistics.fmean(r["test_acc"] for r in runs),
        "epochs": statistics.fmean(r["epochs"] for r in runs),
        "epochs_planned": epochs,
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
        "seeds": [r["seed"] for r in runs],
    }
    if len(runs) > 1:
        result.update(
            seconds_std=statistics.stdev(r["seconds"] for r in runs),
            test_acc_std=statistics.stdev(r["test_acc"] for r in runs),
            final_test_acc=statistics.fmean(r["final_test_acc"] for r in runs),
            test_acc_by_tta={k: statistics.fmean(r["test_acc_by_tta"][k] for r in runs) for k in first["test_acc_by_tta"]},
            per_seed=[
                {k: r[k] for k in ("seed", "reached", "seconds", "test_acc", "epochs", "final_test_acc", "test_acc_by_tta")}
                for r in runs
            ],
        )
    else:
        result.update(final_test_acc=first["final_test_acc"], test_acc_by_tta=first["test_acc_by_tta"])
    result.update(
        status=",".join(sorted({r["status"] for r in runs})),
        device=first["device"],
        train_images=first["train_images"],
        test_images=first["test_images"],
        params_count=first["params_count"],
        images_per_s=statistics.fmean(r["images_per_s"] for r in runs),
        params=params.to_dict(),
    )
    emit(result, args.json)
    return 0 if result["reached"] else 1


def _one_run(ds: Any, split: Any, params: Any, device: torch.device, epochs: int, seed: int, target: float) -> dict[str, Any]:
    """One timed run: seconds until ``target`` (or the whole run), accuracy then and at the last epoch."""
    t0 = time.perf_counter()
    dd = data.final_data(ds, split, device)
    torch.manual_seed(seed)
    model = models.build(params, dd.num_classes)
    levels = models.get(params.model).capabilities.tta_levels
    tta = model.tta if levels else None  # train evaluates epochs before the last with one pass (module docstring)
    reached: dict[str, Any] = {}

    def on_epoch(r: EpochResult, _snapshot: Callable[[], dict[str, Any]]) -> None:
        elapsed = time.perf_counter() - t0
        print(
            f"epoch {r.epoch}: test acc {r.val_acc:.4f}{' (with tta)' if tta and r.epoch == epochs else ''}, "
            f"train loss {r.train_loss:.4f}, "
            f"{r.images_per_s:.0f} img/s, {r.seconds:.1f} s (train + test), {elapsed:.1f} s since start",
            flush=True,
        )
        if r.val_acc >= target and not reached:
            reached.update(epoch=r.epoch, seconds=elapsed, test_acc=r.val_acc)
            raise StopTraining

    history = train(model, dd, params, epochs=epochs, seed=seed, on_epoch=on_epoch)
    total = time.perf_counter() - t0
    last = history.epochs[-1] if history.epochs else None
    done = history.epochs
    by_tta = {}
    if tta is not None and done:  # after the clock: the last model at each test-time augmentation level
        for level in levels:
            model.tta = level  # type: ignore[assignment]
            by_tta[str(level)] = evaluate(model, dd.eval_x, dd.eval_y, mean=dd.mean, std=dd.std, precision=params.precision).acc
        model.tta = tta  # type: ignore[assignment]
    return {
        "test_acc_by_tta": by_tta,
        "seed": seed,
        "reached": bool(reached),
        "seconds": reached.get("seconds", total),
        "test_acc": reached.get("test_acc", last.val_acc if last else 0.0),
        "final_test_acc": last.val_acc if last else 0.0,
        "epochs": reached.get("epoch", len(done)),
        "seconds_per_epoch": statistics.fmean(e.seconds for e in done) if done else 0.0,
        "peak_mem_mb": max((e.peak_mem_mb for e in done), default=0.0),
        "status": history.status,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "train_images": len(dd.train_y),
        "test_images": len(dd.eval_y),
        "params_count": models.count_params(model),
        "images_per_s": statistics.fmean(e.images_per_s for e in done) if done else 0.0,
    }
