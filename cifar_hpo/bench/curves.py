"""``cifar-hpo bench curves``: record a learning-curve bank from real training.

    cifar-hpo bench curves --data ../shared/data/cifar10-jpeg.tar.gz --study fast_light --configs 40

Draws ``--configs`` configurations from the study's search space (Optuna's
random sampler, seeded), trains each one for the study's epochs on a
stratified subset of the training split (``--train-images``) and evaluates it
on the whole validation split (the study's 9:1 split, never the test split)
after every epoch. Each fidelity design (`DESIGNS`) is a bank of its own,
recorded configuration by configuration side by side from the same draws:

- ``onecycle``: today's recipe (the search space's schedule over the whole
  trial); per epoch the plain accuracy and the accuracy of an EMA of the weights.
- ``wsd``: warmup-stable-decay (`training.optim.lr_factor`); at `PROBE_EPOCHS` a short
  cooldown branch off the stable weights is evaluated (`training.train`'s
  ``probe_epochs``) while the run continues; its extra steps are recorded.

Banks live in ``$CIFAR_HPO_CACHE/banks/``; a configuration is appended (the file
rewritten atomically) as soon as it finishes, so a killed recording continues
where it stopped. ``cifar-hpo bench search`` replays pruning rules on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from cifar_hpo import data, models
from cifar_hpo.data import cache_home
from cifar_hpo.data.split import stratified_take
from cifar_hpo.device import resolve_device
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.storage.checkpoint import atomic_write_bytes
from cifar_hpo.study.pruning import EVAL_COST_PER_IMAGE
from cifar_hpo.study.search_space import suggest_params
from cifar_hpo.study.spec import load_spec
from cifar_hpo.training.loop import train

BANK_VERSION = 1
# What each design changes in a configuration's recipe and what it measures per epoch.
DESIGNS: dict[str, dict[str, Any]] = {
    "onecycle": {"schedule": None, "probes": False, "ema_horizon": 0.5},
    "wsd": {"schedule": "wsd", "probes": True, "ema_horizon": None},
}
# Epochs where the wsd design records a cooldown probe (those before the run's own
# decay): the rungs of successive halving / hyperband with reduction factor 2 to 6 from 1 epoch.
PROBE_EPOCHS = (1, 2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class BankSpec:
    """What one bank holds: a study's search space sampled ``configs`` times, trained ``epochs`` epochs."""

    study: str
    design: str
    epochs: int
    configs: int
    train_images: int
    seed: int = 0

    def file_name(self, split_hash: str) -> str:
        return f"{self.study}-{self.design}-e{self.epochs}-n{self.train_images}-m{self.configs}-s{self.seed}-{split_hash}.json"


def banks_dir() -> Path:
    """``$CIFAR_HPO_CACHE/banks``."""
    return cache_home() / "banks"


def draw_configs(study_spec: Any, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` configurations of the study's search space from a seeded random sampler.

    Each: ``params`` (Optuna's values), ``distributions`` (JSON) and ``trial_params``.
    """
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    out = []
    for _ in range(count):
        trial = study.ask()
        params = suggest_params(study_spec, trial)
        out.append(
            {
                "params": dict(trial.params),
                "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in trial.distributions.items()},
                "trial_params": params.to_dict(),
            }
        )
        study.tell(trial, 0.0)
    return out


def subset_data(ds: Any, split: Any, train_images: int, val_images: int | None, seed: int, device: torch.device) -> Any:
    """Stratified subsets of the split's training (and, if asked, validation) images; never the test split."""
    if not 1 <= train_images <= len(split.train_idx):
        raise UserError(f"--train-images {train_images}: the split has {len(split.train_idx)} training images; pass 1..that")
    if val_images is not None and not 1 <= val_images <= len(split.val_idx):
        raise UserError(f"--val-images {val_images}: the split has {len(split.val_idx)} validation images; pass 1..that")
    rng = np.random.default_rng(seed)
    train_idx = stratified_take(ds.train_y, split.train_idx, train_images, rng)
    val_idx = split.val_idx if val_images is None else stratified_take(ds.train_y, split.val_idx, val_images, rng)
    digest = hashlib.sha256(split.hash.encode())
    for idx in (train_idx, val_idx):
        digest.update(b"|" + idx.astype("<i8").tobytes())
    sub = dataclasses.replace(split, train_idx=train_idx, val_idx=val_idx, hash=digest.hexdigest()[:16])
    return data.trial_data(ds, sub, device)


def read_bank(path: Path) -> dict[str, Any]:
    """A bank file: ``{"header": {...}, "configs": [...]}``."""
    try:
        bank = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"bank {path} cannot be read ({e}); delete it to record it again") from None
    if bank.get("header", {}).get("version") != BANK_VERSION:
        raise UserError(f"bank {path} has another format version; delete it to record it again")
    return bank


def _write(path: Path, bank: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(bank).encode(), mode=0o644)


def train_config(config: dict[str, Any], design: str, data: Any, epochs: int, seed: int) -> dict[str, Any]:
    """Train one configuration under ``design``; its per-epoch curve and costs."""
    how = DESIGNS[design]
    params = TrialParams.from_dict(config["trial_params"])
    if how["schedule"] is not None:
        params = params.replace(schedule=how["schedule"])
    torch.manual_seed(seed)
    model = models.build(params, data.num_classes)
    history = train(
        model,
        data,
        params,
        epochs=epochs,
        seed=seed,
        probe_epochs=PROBE_EPOCHS if how["probes"] else (),
        ema_horizon=how["ema_horizon"],
    )
    n = len(data.train_y)
    steps_per_epoch = n // params.batch_size if n >= params.batch_size else 1
    eval_epochs = len(data.eval_y) / n * EVAL_COST_PER_IMAGE  # the bank's own; bench search charges the study's
    return {
        "status": history.status,
        "steps_per_epoch": steps_per_epoch,
        "seconds": history.seconds,
        "val_acc": [e.val_acc for e in history.epochs],
        "probe_acc": [e.probe_acc for e in history.epochs],
        # Extra work per epoch, in training epochs: a probe's steps, an EMA evaluation.
        "probe_cost": [e.probe_steps / steps_per_epoch for e in history.epochs],
        "ema_acc": [e.ema_acc for e in history.epochs],
        "ema_cost": eval_epochs if how["ema_horizon"] is not None else 0.0,
    }


def record(
    specs: Sequence[BankSpec],
    study_spec: Any,
    data: Any,
    *,
    folder: Path,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Record (or continue) one bank per spec, side by side configuration by configuration.

    All specs must share study, epochs, configs, train images and seed (they differ in design).
    """
    configs = draw_configs(study_spec, specs[0].configs, specs[0].seed)
    paths, banks = [], []
    for s in specs:
        path = folder / s.file_name(data.split_hash)
        header = {
            "version": BANK_VERSION,
            "study": s.study,
            "design": s.design,
            "epochs": s.epochs,
            "configs": s.configs,
            "train_images": len(data.train_y),
            "val_images": len(data.eval_y),
            "seed": s.seed,
            "split_hash": data.split_hash,
            "device": str(data.device),
        }
        bank: dict[str, Any] = read_bank(path) if path.is_file() else {"header": header, "configs": []}
        paths.append(path)
        banks.append(bank)
    for i, config in enumerate(configs):
        for s, path, bank in zip(specs, paths, banks, strict=True):
            if i < len(bank["configs"]):
                continue
            started = time.time()
            curve = train_config(config, s.design, data, s.epochs, seed=s.seed * 100_003 + i)
            bank["configs"].append({"index": i, **config, **curve})
            _write(path, bank)
            log(
                f"[{s.design}] config {i + 1}/{len(configs)}: final {curve['val_acc'][-1] if curve['val_acc'] else 0:.4f} "
                f"({time.time() - started:.0f} s)"
            )
    return paths


@dataclass(frozen=True)
class BankImages:
    """The images a bank (and ``bench pruning``'s live check) trains on: those flags as plain values.

    Attributes:
        train_images: ``--train-images``, stratified from the study split's training images.
        val_images: ``--val-images``, stratified from its validation images; None: all of them.
        source: ``--data``; None: the study file's data source.
        data_dir: ``--data-dir`` (where 'cifar10' is downloaded); None: the default.
        cache_dir: ``--cache-dir`` (decoded-array cache); None: the default.
        device: ``--device`` (`device.resolve_device`).
    """

    train_images: int
    val_images: int | None
    source: str | None = None
    data_dir: Path | None = None
    cache_dir: Path | None = None
    device: str = "auto"


@dataclass(frozen=True)
class BankOptions:
    """Which banks ``bench curves`` records and ``bench search`` replays: the bank flags as plain values.

    Built once by a bench's ``main`` from its arguments; nothing below it reads them.

    Attributes:
        study: ``--study``, a study name or file: its search space, network and data.
        designs: the fidelity designs (keys of `DESIGNS`), one bank each.
        configs: ``--configs``, configurations per bank (at least 2).
        epochs: ``--epochs`` per configuration; None (or 0): the study's.
        seed: ``--seed`` of the draws and of the image subset.
        images: what the banks train and evaluate on.
        bank_dir: ``--bank-dir``; None: `banks_dir`.
    """

    study: str
    designs: tuple[str, ...]
    configs: int
    epochs: int | None
    seed: int
    images: BankImages
    bank_dir: Path | None = None

    @property
    def folder(self) -> Path:
        """Where the banks are kept."""
        return self.bank_dir or banks_dir()


def _specs(options: BankOptions) -> tuple[Any, list[BankSpec]]:
    """The study spec and one `BankSpec` per design of ``options``."""
    study_spec = load_spec(options.study)
    unknown = [d for d in options.designs if d not in DESIGNS]
    if unknown:
        raise UserError(f"--designs: unknown design {unknown[0]!r}; valid: {', '.join(DESIGNS)}")
    if options.configs < 2:
        raise UserError(f"--configs {options.configs}: a bank needs at least 2 configurations")
    epochs = options.epochs or study_spec.epochs
    train_images = options.images.train_images
    return study_spec, [BankSpec(study_spec.name, d, epochs, options.configs, train_images, options.seed) for d in options.designs]


def bank_paths(options: BankOptions) -> list[Path]:
    """The newest cached bank of each design that ``options`` describe, without recording anything."""
    _, specs = _specs(options)
    folder = options.folder
    paths = []
    for s in specs:
        found = sorted(folder.glob(s.file_name("*")), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no {s.design} bank in {folder}; record it with `cifar-hpo bench curves` (or drop --no-record)")
        paths.append(found[-1])
    return paths


def ensure(options: BankOptions) -> list[Path]:
    """Record (or finish recording) the banks ``options`` describe; their paths."""
    study_spec, specs = _specs(options)
    return record(specs, study_spec, bank_data(study_spec, options.images, options.seed), folder=options.folder)


def bank_data(study_spec: Any, images: BankImages, seed: int) -> Any:
    """The images a bank (and ``bench pruning``'s live check) trains on: ``images.train_images`` /
    ``images.val_images`` stratified from the study's split, drawn with ``seed``, on ``images.device``."""
    ds = data.load_dataset(images.source or study_spec.data.source, data_dir=images.data_dir, cache_dir=images.cache_dir)
    split = data.split_dataset(ds, val_fraction=study_spec.data.val_fraction, seed=study_spec.data.split_seed)
    return subset_data(ds, split, images.train_images, images.val_images, seed, resolve_device(images.device))


def main(args: argparse.Namespace) -> int:
    """Record the banks of ``--designs`` for ``--study``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    images = BankImages(train_images=args.train_images, val_images=args.val_images, source=args.data,
                        data_dir=args.data_dir, cache_dir=args.cache_dir, device=args.device)  # fmt: skip
    designs = tuple(d.strip() for d in args.designs.split(",") if d.strip())
    options = BankOptions(study=args.study, designs=designs, configs=args.configs, epochs=args.epochs, seed=args.seed,
                          images=images, bank_dir=args.bank_dir)  # fmt: skip
    for p in ensure(options):
        print(f"bank {p}")
    return 0
