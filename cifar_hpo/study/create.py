"""Create a study in its database, or check that the existing one is the same study; its sampler (its pruner: `pruning.make_pruner`).

    refuse_foreign(spec, url)                            # `cifar-hpo run`, reading only, before it opens the database to write
    study = open_study(spec, url, data.split_hash, st)   # `cifar-hpo run` before any worker starts

A study of ours is one that ``run`` created: every version wrote its split (``split_hash``) and
its spec as study attributes at once. A study of the same name that another tool made is refused
and never written to, nor is a study of ours continued with another direction, split or epochs
per trial once it has finished trials.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from typing import Any

import optuna

from cifar_hpo import storage
from cifar_hpo.errors import UserError
from cifar_hpo.storage import optuna_compat, record
from cifar_hpo.study.objective import finished_count
from cifar_hpo.study.pruning import make_pruner
from cifar_hpo.study.search_space import recipe_point
from cifar_hpo.study.spec import StudySpec

# How long a study of that name without our attributes may be one that a run started at the same
# moment is creating (it writes them a few milliseconds after creating the study).
CREATING_S = 5.0


OURS = ("split_hash", "spec")  # study attributes every version of ``run`` wrote when it created a study


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
    """The spec's sampler with this ``seed`` (see ``sampler_seed``); under pause and promote, one that sees paused trials."""
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with storage.quiet_experimental():
        tpe = optuna.samplers.TPESampler(
            multivariate=spec.sampler.multivariate,
            n_startup_trials=spec.sampler.n_startup_trials,
            constant_liar=True,  # parallel workers: running trials count as bad, so they spread out
            seed=seed,
        )
    return PausedAsPruned(tpe) if spec.pruner.kind == "promote" else tpe


def shown_as_pruned(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """A paused trial as the sampler sees it: pruned at the rung where it paused (others as they are)."""
    if not record.is_paused(trial):
        return trial
    shown = copy.copy(trial)
    shown.state = optuna.trial.TrialState.PRUNED
    return shown


class PausedAsPruned(optuna.samplers.BaseSampler):
    """A sampler that sees each paused trial as pruned at its rung, as Optuna's pruned trials are seen.

    A paused trial is RUNNING in Optuna's tables (`scheduling`). TPE would count it neither among
    its startup trials (finished ones only) nor by its value (its constant liar ranks every running
    trial below every finished one): in a promotion study most trials stay paused until the end,
    and TPE kept drawing at random (``bench search --samplers``, docs/pruning.md). Shown as pruned,
    a paused trial is ranked as TPE ranks pruned trials: by the epoch it reached, then its value there.
    """

    def __init__(self, base: optuna.samplers.BaseSampler) -> None:
        self.base = base

    def _view(self, study: optuna.Study) -> Any:
        return optuna_compat.TrialsView(study, shown_as_pruned)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self.base.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.base.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:  # fmt: skip
        return self.base.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: Any, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def enqueue_recipe(study: optuna.Study, spec: StudySpec) -> None:
    """Make the model's registry recipe the new study's first configuration, where its search space contains it.

    So even a tiny study starts from a known-good point and its sampler learns from it; the trial is
    marked (`record.RECIPE`) and, under pause and promote, trains to the end (`scheduling`). Where
    the space cannot express the recipe (`search_space.recipe_point` says why) nothing is enqueued.
    """
    point, _ = recipe_point(spec)
    if point is not None and not any(record.read(t).origin == record.RECIPE for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(point, user_attrs=record.origin_attrs(record.RECIPE), skip_if_exists=True)


def split_attrs(spec: StudySpec, split_hash: str) -> dict[str, Any]:
    """What identifies the data a study's trials saw."""
    d = spec.data
    return {"split_hash": split_hash, "data": d.source, "subset": d.subset, "val_fraction": d.val_fraction}


def _summary(st: optuna.storages.BaseStorage, name: str) -> optuna.study.StudySummary | None:
    """The summary of study ``name`` in ``st``, or None (read only)."""
    return next((s for s in optuna.get_all_study_summaries(st, include_best_trial=False) if s.study_name == name), None)


def _ours(summary: optuna.study.StudySummary) -> bool:
    """Whether ``cifar-hpo run`` made the study (it has one of the attributes `OURS`)."""
    return any(key in summary.user_attrs for key in OURS)


def existing_study(spec: StudySpec, url: str, st: optuna.storages.BaseStorage) -> optuna.study.StudySummary | None:
    """The study ``spec.name`` at ``url`` when there is one, made by ``cifar-hpo run``.

    Raises:
        UserError: a study of that name that another tool made (it is left as it is).
    """
    summary = _summary(st, spec.name)
    deadline = time.monotonic() + CREATING_S
    while summary is not None and not _ours(summary) and summary.n_trials == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # perhaps a run started at the same moment, about to write its attributes
        summary = _summary(st, spec.name)
    if summary is not None and not _ours(summary):
        raise UserError(
            f"study {spec.name!r} in {storage.mask_url(url)} was not made by cifar-hpo (it has none of the attributes "
            f"a run records, {', '.join(OURS)}), so it is left alone; use another study name (name = ... in the "
            "study file) or another --storage"
        )
    return summary


def _check_same_study(spec: StudySpec, url: str, st: optuna.storages.BaseStorage, existing: optuna.study.StudySummary,
                      split_hash: str | None) -> None:  # fmt: skip
    """Refuse to continue ``existing`` with another direction, split (where ``split_hash`` is known) or epochs per trial.

    Raises:
        UserError: it differs (nothing is written then).
    """
    shown = storage.mask_url(url)
    direction = existing.directions[0].name.lower() if existing.directions else "?"
    if direction != spec.direction:
        raise UserError(
            f"study {spec.name!r} in {shown} maximizes/minimizes differently ({direction}); "
            "use another study name (name = ... in the study file) or another --storage"
        )
    had = existing.user_attrs.get("split_hash")
    if split_hash is not None and had is not None and had != split_hash:
        wanted = split_attrs(spec, split_hash)
        old = {k: existing.user_attrs.get(k) for k in ("data", "subset", "val_fraction")}
        raise UserError(
            f"study {spec.name!r} in {shown} was run on another split ({old}, hash {had}); "
            f"this run's is ({ {k: wanted[k] for k in old} }, hash {split_hash}): use the same --data/--subset, "
            "another --storage, or a study file with another name"
        )
    ran = (existing.user_attrs.get("spec") or {}).get("epochs")
    if ran is not None and ran != spec.epochs:
        # The pruner compares trials epoch by epoch and the best is retrained for the study's epochs: one length per study.
        finished = finished_count(optuna.load_study(study_name=spec.name, storage=st))
        if finished:
            raise UserError(
                f"study {spec.name!r} in {shown} has {finished} finished trials of {ran} epochs each and this run asks "
                f"for {spec.epochs}: run it with --epochs {ran}, or use another study name (name = ... in the study file) "
                "or another --storage"
            )


def refuse_foreign(spec: StudySpec, url: str) -> None:
    """Refuse, reading only, a study at ``url`` that `open_study` would refuse before it knows the split.

    ``run`` calls it before it opens an existing database to write: opening one sets an SQLite
    file's journal mode, a write already, and the database may be another tool's.

    Raises:
        UserError: a study of that name made by another tool, or of ours with another direction or epochs.
    """
    st = storage.open_existing(url, empty_ok=True)
    if st is None:
        return
    try:
        existing = existing_study(spec, url, st)
        if existing is not None:
            _check_same_study(spec, url, st, existing, None)
    finally:
        st.engine.dispose()  # its read-only connections are not needed again


def open_study(spec: StudySpec, url: str, split_hash: str, st: optuna.storages.RDBStorage | None = None) -> optuna.Study:
    """Create the study, or check that an existing one is ours, with the same direction, split and epochs.

    ``st``: the storage this process already opened on ``url`` (one per process where one will do).
    An existing study without finished trials takes this run's epochs (its recorded ``spec`` follows).

    Raises:
        UserError: the name exists, made by another tool, or with another direction, split or (once
            it has finished trials) epochs per trial; nothing is written then.
    """
    st = st or storage.open_storage(url)
    existing = existing_study(spec, url, st)
    if existing is not None:
        _check_same_study(spec, url, st, existing, split_hash)
    study = optuna.create_study(
        study_name=spec.name, storage=st, direction="maximize", load_if_exists=True,  # spec checks direction
        sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec),
    )  # fmt: skip
    if existing is None:
        wanted = split_attrs(spec, split_hash)
        for key, value in {**wanted, "model": spec.model, "search_space": spec.search_space, "spec": spec.to_dict()}.items():
            study.set_user_attr(key, value)
        enqueue_recipe(study, spec)
    elif (existing.user_attrs.get("spec") or {}).get("epochs", spec.epochs) != spec.epochs:
        study.set_user_attr("spec", spec.to_dict())  # no trial finished at the old length: the study is this run's
    if (existing is None or "uid" not in existing.user_attrs) and "uid" not in study.user_attrs:
        # Tells this study from an earlier one of the same name (another database, a deleted one): its snapshots are its own.
        study.set_user_attr("uid", uuid.uuid4().hex)
    return study
