"""One test per private Optuna name in cifar_hpo/optuna_compat.py: each fails with a message saying what changed.

Run on the newest Optuna (the main venv) and on the lowest one pyproject.toml allows (.ci/run does both).
"""

from __future__ import annotations

import copy
import io
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.storage import heartbeat, optuna_compat, record


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    st = storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name="compat", storage=st)


def test_trial_and_study_ids_are_the_storage_ids(study: optuna.Study) -> None:
    trial = study.ask()
    st = optuna_compat.study_storage(study)
    assert isinstance(st, optuna.storages.BaseStorage), f"Study._storage is a {type(st).__name__}, not a storage"
    by_number = st.get_trial_id_from_study_id_trial_number(optuna_compat.study_id(study), trial.number)
    assert optuna_compat.trial_id(trial) == by_number, "Trial._trial_id is no longer the storage's trial id"
    frozen = study.get_trials(deepcopy=False)[0]
    assert optuna_compat.trial_id(frozen) == by_number, "FrozenTrial._trial_id is no longer the storage's trial id"
    assert st.get_trial(by_number).number == trial.number


def test_a_missing_private_name_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"object\._trial_id is gone; cifar_hpo/optuna_compat.py"):
        optuna_compat.trial_id(object())  # type: ignore[arg-type]


def test_create_trial_hook_is_called_when_a_study_asks(tmp_path: Path) -> None:
    assert hasattr(optuna.storages.RDBStorage, optuna_compat.CREATE_TRIAL_HOOK), (
        f"optuna {optuna.__version__} has no RDBStorage.{optuna_compat.CREATE_TRIAL_HOOK}: trials get no heartbeat at creation"
    )
    st = storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3")
    trial = optuna.create_study(study_name="hook", storage=st).ask()
    # The hook records the first heartbeat at once; without it the trial has none until its heartbeat thread starts.
    assert heartbeat._with_heartbeat(st.engine, [optuna_compat.trial_id(trial)]) == {optuna_compat.trial_id(trial)}, (
        f"optuna {optuna.__version__} no longer calls RDBStorage.{optuna_compat.CREATE_TRIAL_HOOK} when a study asks for a trial"
    )


def test_heartbeat_table_holds_the_trials_that_beat(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    quiet = optuna.create_study(study_name="quiet", storage=storage.open_storage(url, heartbeat=False))
    silent = quiet.ask()  # no heartbeat storage: no row
    st = storage.open_storage(url)
    st.record_heartbeat(optuna_compat.trial_id(silent))
    other = quiet.ask()
    ids = [optuna_compat.trial_id(silent), optuna_compat.trial_id(other)]
    assert heartbeat._with_heartbeat(st.engine, ids) == {ids[0]}, (
        f"Optuna's table {optuna_compat.HEARTBEAT_TABLE!r} does not hold one row per trial that sent a heartbeat"
    )


def test_stale_trials_hook_is_what_fail_stale_trials_asks(study: optuna.Study, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def spy(self: optuna.storages.RDBStorage, study_id: int) -> list[int]:
        asked.append(study_id)
        return []

    monkeypatch.setattr(heartbeat.HeartbeatStorage, optuna_compat.STALE_TRIALS_HOOK, spy)
    study.ask()
    optuna.storages.fail_stale_trials(study)
    assert asked == [optuna_compat.study_id(study)], (
        f"optuna {optuna.__version__}: fail_stale_trials no longer asks RDBStorage.{optuna_compat.STALE_TRIALS_HOOK}; "
        "trials that never sent a heartbeat would stay RUNNING"
    )


def test_rdb_storage_takes_a_stale_trial_callback() -> None:
    name = optuna_compat.stale_callback_argument()
    assert name in optuna_compat.rdb_arguments()
    callback = optuna_compat.retry_callback_class()(max_retry=1, inherit_intermediate_values=True)
    assert callable(callback)


def test_the_storage_gives_back_its_stale_trial_callback(tmp_path: Path) -> None:
    # storage.py re-queues stale trials itself with the callback the storage was opened with (4.9 renamed its getter).
    st = storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3")
    callback = optuna_compat.stale_trial_callback(st)
    assert isinstance(callback, optuna_compat.retry_callback_class()), (
        f"optuna {optuna.__version__}: the storage did not give back the stale-trial callback it was opened with"
    )


def test_artifacts_we_write_are_where_optunas_own_store_reads_them(tmp_path: Path) -> None:
    store = storage.artifact_store(f"sqlite:///{tmp_path}/db.sqlite3", tmp_path)
    store.write("abc-123", io.BytesIO(b"weights"))
    plain = optuna.artifacts.FileSystemArtifactStore(str(tmp_path / "artifacts"))
    with plain.open_reader("abc-123") as f:
        assert f.read() == b"weights", "Optuna's FileSystemArtifactStore no longer keeps artifact ID at base_path/ID"
    assert stat.S_IMODE((tmp_path / "artifacts" / "abc-123").stat().st_mode) == 0o600
    plain.remove("abc-123")
    for bad in ("/etc/passwd", "../outside"):
        with pytest.raises(ValueError):
            store.write(bad, io.BytesIO(b"x"))
    assert not (tmp_path / "outside").exists()


def test_start_times_compare_across_optuna_versions(study: optuna.Study) -> None:
    study.ask()
    (running,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    start = running.datetime_start
    assert start is not None
    assert abs(datetime.now(UTC) - start.astimezone(UTC)) < timedelta(minutes=5), (
        f"FrozenTrial.datetime_start {start!r} is neither local naive time (Optuna 4) nor aware UTC (Optuna 5)"
    )


def test_a_trials_view_is_what_a_sampler_reads(study: optuna.Study) -> None:
    """TPE reads trials through Study._get_trials (with its cache) and get_trials: the view must change both."""
    first = study.ask()
    first.suggest_float("x", 0, 1)
    study.tell(first, 0.5)
    running = study.ask()
    running.suggest_float("x", 0, 1)

    def as_pruned(t: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        if t.state != TrialState.RUNNING:
            return t
        shown = copy.copy(t)
        shown.state = TrialState.PRUNED
        return shown

    view = optuna_compat.TrialsView(study, as_pruned)
    for read in (lambda: view._get_trials(deepcopy=False, states=(TrialState.PRUNED,), use_cache=True),
                 lambda: view._get_trials(deepcopy=False, states=(TrialState.PRUNED,), use_cache=False),
                 lambda: view.get_trials(deepcopy=False, states=(TrialState.PRUNED,))):  # fmt: skip
        assert [t.number for t in read()] == [running.number], f"optuna {optuna.__version__}: Study._get_trials changed"
    assert view.directions == study.directions and study.trials[1].state == TrialState.RUNNING
    sampled = optuna.samplers.TPESampler(n_startup_trials=1, seed=0, constant_liar=True).sample_independent(
        view, study.trials[1], "y", optuna.distributions.FloatDistribution(0, 1))  # fmt: skip
    assert 0 <= sampled <= 1  # TPE runs on the view


def test_a_paused_trial_is_claimed_by_one_of_two_takers(tmp_path: Path) -> None:
    """The claim deletes a row of Optuna's user-attribute table (USER_ATTR_TABLE) only if it holds the marker."""
    st = storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3")
    study = optuna.create_study(study_name="claim", storage=st)
    trial = study.ask()
    record.write_paused(trial, epoch=1, rank=2, of=3, keep=1, text="paused at epoch 1", wall_s=1.0)
    marker = record.read(study.trials[0]).paused
    assert marker is not None and record.is_paused(study.trials[0])
    tid = optuna_compat.trial_id(trial)
    assert record.claim_paused(st, tid, marker) is True, f"optuna {optuna.__version__}: no {optuna_compat.USER_ATTR_TABLE} row?"
    assert record.claim_paused(st, tid, marker) is False
    assert record.read(study.trials[0]).paused is None and not record.is_paused(study.trials[0])
    record.write_paused(trial, epoch=3, rank=1, of=3, keep=1, text="paused at epoch 3", wall_s=2.0)
    assert record.claim_paused(st, tid, marker) is False  # an older pause's marker takes nothing
