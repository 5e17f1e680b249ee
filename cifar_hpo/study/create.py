"""Create a study in its database, or check that the existing one is the same study; its sampler (its pruner: `pruning.make_pruner`).

    study = open_study(spec, url, data.split_hash, st)   # `cifar-hpo run` before any worker starts
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import optuna

from cifar_hpo import storage
from cifar_hpo.errors import UserError
from cifar_hpo.study.pruning import make_pruner
from cifar_hpo.study.spec import StudySpec


def sampler_seed(spec: StudySpec) -> int:
    """This process's sampler seed: the study's ``seed`` mixed with a nonce of this process.

    Processes that start together (``--workers``, machines on one database) must not draw the same
    parameters, and they cannot agree on offsets without coordination: an offset counted from the
    trials so far was the same in every process started at once (2 of 4 trials were duplicates).
    The seed actually used is recorded in each trial's ``sampler_seed`` user attribute. What stays
    reproducible from the study's ``seed`` is each trial's training (see ``objective``).
    """
    nonce = int.from_bytes(os.urandom(8), "little")
    return (spec.seed * 1_000_003 + nonce) % 2**32


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler with this ``seed`` (see ``sampler_seed``)."""
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with storage.quiet_experimental():
        return optuna.samplers.TPESampler(
            multivariate=spec.sampler.multivariate,
            n_startup_trials=spec.sampler.n_startup_trials,
            constant_liar=True,  # parallel workers: running trials count as bad, so they spread out
            seed=seed,
        )


def split_attrs(spec: StudySpec, split_hash: str) -> dict[str, Any]:
    """What identifies the data a study's trials saw."""
    d = spec.data
    return {"split_hash": split_hash, "data": d.source, "subset": d.subset, "val_fraction": d.val_fraction}


def open_study(spec: StudySpec, url: str, split_hash: str, st: optuna.storages.RDBStorage | None = None) -> optuna.Study:
    """Create the study, or check that an existing one has the same direction and split.

    ``st``: the storage this process already opened on ``url`` (one per process where one will do).

    Raises:
        UserError: the name exists with another direction or split (nothing is written then).
    """
    st = st or storage.open_storage(url)
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(st, include_best_trial=False)}
    wanted = split_attrs(spec, split_hash)
    existing = summaries.get(spec.name)
    if existing is not None:
        direction = existing.directions[0].name.lower() if existing.directions else "?"
        if direction != spec.direction:
            raise UserError(
                f"study {spec.name!r} in {storage.mask_url(url)} maximizes/minimizes differently ({direction}); "
                "use another study name (name = ... in the study file) or another --storage"
            )
        had = existing.user_attrs.get("split_hash")
        if had is not None and had != split_hash:
            old = {k: existing.user_attrs.get(k) for k in ("data", "subset", "val_fraction")}
            raise UserError(
                f"study {spec.name!r} in {storage.mask_url(url)} was run on another split ({old}, hash {had}); "
                f"this run's is ({ {k: wanted[k] for k in old} }, hash {split_hash}): use the same --data/--subset, "
                "another --storage, or a study file with another name"
            )
    study = optuna.create_study(
        study_name=spec.name, storage=st, direction="maximize", load_if_exists=True,  # spec checks direction
        sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec),
    )  # fmt: skip
    if existing is None:
        for key, value in {**wanted, "model": spec.model, "search_space": spec.search_space, "spec": spec.to_dict()}.items():
            study.set_user_attr(key, value)
    if (existing is None or "uid" not in existing.user_attrs) and "uid" not in study.user_attrs:
        # Tells this study from an earlier one of the same name (another database, a deleted one): its snapshots are its own.
        study.set_user_attr("uid", uuid.uuid4().hex)
    return study
