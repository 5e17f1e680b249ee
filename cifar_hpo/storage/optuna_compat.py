"""Every use of Optuna's private API, in one place, for the Optuna range pyproject.toml states (4.3 to 5.x).

    python -m pytest tests/test_optuna_compat.py -q     # one test per private name: fails loudly when Optuna changes it

What has a public equivalent uses it elsewhere (``inspect.signature`` for the
RDBStorage arguments, ``FrozenTrial.datetime_start`` for start times, our own
artifact paths, ``BaseStorage.get_all_trials``). What is left has none:

- `trial_id`, `study_id`, `study_storage`: ``Trial._trial_id``,
  ``Study._study_id``, ``Study._storage``. Optuna's storage API is keyed by
  these ids, but Trial and Study do not expose them.
- `CREATE_TRIAL_HOOK`: ``RDBStorage._create_new_trial``, which Optuna's cache
  layer (used by every Study) calls instead of the public ``create_new_trial``;
  overriding it is the only way to see a trial the moment it is created.
- `STALE_TRIALS_HOOK`: ``RDBStorage._get_stale_trial_ids``, which
  ``optuna.storages.fail_stale_trials`` asks for the trials to fail; overriding
  it adds trials that never sent a heartbeat.
- `HEARTBEAT_TABLE`: the table of Optuna's database schema holding one row per
  trial that sent a heartbeat (a schema name: Optuna migrates it with alembic).
- `TrialsView`: a study whose trials a sampler reads through ``Study._get_trials``
  (the private reader Optuna's samplers call, with its trial cache) and
  ``get_trials``, each trial shown as a function of ours makes it: a paused
  trial (RUNNING in Optuna's tables) is shown to TPE as pruned at its rung.
- `USER_ATTR_TABLE`: the table holding trials' user attributes, one row per
  (trial_id, key) with the value as JSON in ``value_json``: a paused trial is
  claimed by deleting its ``paused`` row, which exactly one worker can do
  (`record.claim_paused`); Optuna's API has no conditional write.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Container
from typing import Any

import optuna

CREATE_TRIAL_HOOK = "_create_new_trial"
STALE_TRIALS_HOOK = "_get_stale_trial_ids"
HEARTBEAT_TABLE = "trial_heartbeats"
USER_ATTR_TABLE = "trial_user_attributes"


def _private(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"optuna {optuna.__version__}: {type(obj).__name__}.{name} is gone; cifar_hpo/optuna_compat.py must find it "
            "another way (or install an Optuna in the range pyproject.toml states)"
        ) from None


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (what ``storage.get_trial`` and friends take)."""
    return int(_private(trial, "_trial_id"))


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study."""
    return int(_private(study, "_study_id"))


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes through (Optuna's cache layer over the RDBStorage)."""
    return _private(study, "_storage")  # type: ignore[no-any-return]


def rdb_arguments() -> set[str]:
    """The keyword arguments ``RDBStorage`` takes in this Optuna (public, via its signature)."""
    return set(inspect.signature(optuna.storages.RDBStorage.__init__).parameters)


def stale_callback_argument() -> str:
    """RDBStorage's argument for the callback called on a stale trial.

    Optuna 4.9 renamed ``failed_trial_callback`` to ``heartbeat_stale_trial_callback``.
    """
    names = rdb_arguments()
    for name in ("heartbeat_stale_trial_callback", "failed_trial_callback"):
        if name in names:
            return name
    raise RuntimeError(f"optuna {optuna.__version__}: RDBStorage takes no stale-trial callback (arguments: {sorted(names)})")


def stale_trial_callback(storage: optuna.storages.BaseStorage) -> Any:
    """The stale-trial callback ``storage`` was opened with, or None.

    Optuna 4.9 renamed ``get_failed_trial_callback`` to ``get_heartbeat_stale_trial_callback`` (5.0 keeps
    the old name, deprecated); the new name is used wherever it exists.
    """
    for name in ("get_heartbeat_stale_trial_callback", "get_failed_trial_callback"):
        getter = getattr(storage, name, None)
        if getter is not None:
            return getter()
    raise RuntimeError(f"optuna {optuna.__version__}: {type(storage).__name__} has no stale-trial callback getter")


def retry_callback_class() -> Any:
    """Optuna's callback that re-queues a stale trial.

    Optuna 4.9 renamed RetryFailedTrialCallback to RetryHeartbeatStaleTrialCallback (5.0 keeps the
    old name, deprecated); the new name is used wherever it exists.
    """
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or getattr(optuna.storages, "RetryFailedTrialCallback", None)
    if cls is None:
        raise RuntimeError(f"optuna {optuna.__version__} has neither RetryHeartbeatStaleTrialCallback nor RetryFailedTrialCallback")
    return cls


class TrialsView:
    """``study`` as a sampler sees it: every trial it reads passes through ``shown`` first (which must not mutate it).

    Everything else is the study's own (``_storage``, ``directions``, ...). Samplers read trials
    through ``Study._get_trials`` (private, with a per-ask cache) and ``get_trials``; both are here.
    """

    def __init__(self, study: optuna.Study, shown: Callable[[optuna.trial.FrozenTrial], optuna.trial.FrozenTrial]) -> None:
        self._study = study
        self._shown = shown
        _private(study, "_get_trials")  # fails loudly if Optuna renames it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[optuna.trial.TrialState] | None = None,
                    use_cache: bool = False) -> list[optuna.trial.FrozenTrial]:  # fmt: skip
        trials = [self._shown(t) for t in self._study._get_trials(deepcopy=deepcopy, states=None, use_cache=use_cache)]
        return trials if states is None else [t for t in trials if t.state in states]

    def get_trials(self, deepcopy: bool = True, states: Container[optuna.trial.TrialState] | None = None) -> list[optuna.trial.FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.get_trials()
