"""``cifar-hpo retrain``: the best trial (or the default recipe) on train + validation, tested once.

    cifar-hpo retrain --study fast --seeds 3
    cifar-hpo retrain --study baseline --default-params --seeds 3

The protocol and the files it writes: `cifar_hpo.study.retrain`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from cifar_hpo import storage
from cifar_hpo.data import study_data
from cifar_hpo.errors import UserError
from cifar_hpo.models.final import final_path, json_bytes
from cifar_hpo.storage import checkpoint
from cifar_hpo.study.retrain import RETRAIN_DIR, build_final, final_spec, retrain_seed, retrain_source
from cifar_hpo.study.spec import load_spec

if TYPE_CHECKING:
    pass


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo retrain``."""
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    spec = load_spec(args.study)
    results: Path = args.results
    url = storage.storage_url(args.storage, results)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = retrain_source(spec, url, trial=args.trial, default_params=bool(getattr(args, "default_params", False)))
    spec = final_spec(spec, source, epochs=args.epochs, data=args.data, subset=args.subset)
    d = spec.data
    data = study_data(
        d.source, subset=d.subset, val_fraction=d.val_fraction, split_seed=d.split_seed, device=getattr(args, "device", "auto"),
        data_dir=getattr(args, "data_dir", None), cache_dir=getattr(args, "cache_dir", None), final=True,
    )
    if source.study_split_hash and source.study_split_hash != data.split_hash:
        print(
            f"note: this data split ({data.split_hash}) is not the one the study's trials saw "
            f"({source.study_split_hash}): the trial's validation score came from other images",
            flush=True,
        )
    what = "default parameters" if source.default_params else f"trial {source.trial} (val acc {source.trial_value:.4f})"
    print(
        f"retraining {spec.name!r} {what}: {source.params.model}, {spec.epochs} epochs x {args.seeds} seed(s) on "
        f"{len(data.train_y):,} train+val images, testing on {len(data.eval_y):,}; device {data.device}",
        flush=True,
    )
    print("params: " + ", ".join(f"{k}={v}" for k, v in source.params.to_dict().items() if k != "model"), flush=True)
    out_dir = results / spec.name
    folder = out_dir / RETRAIN_DIR
    started = time.time()
    records = [retrain_seed(source, data, spec.epochs, k, args.seeds, folder) for k in range(args.seeds)]
    final = build_final(source, spec, data, records)
    path = final_path(results, spec.name)
    checkpoint.save(final, path)
    checkpoint.atomic_write_bytes(out_dir / "final.json", json_bytes(final), mode=0o644)
    shutil.rmtree(folder, ignore_errors=True)
    spread = f" ± {100 * final['test_acc_std']:.2f}" if len(records) > 1 else ""
    print(
        f"test accuracy {100 * final['test_acc_mean']:.2f}{spread} % over {len(records)} seed(s) "
        f"({time.time() - started:.0f} s); wrote {path} (weights of seed {final['weights_seed']}) and {out_dir / 'final.json'}",
        flush=True,
    )
    return 0


