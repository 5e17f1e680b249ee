"""The worker loop's slot accounting (`cifar_hpo.study.worker`): what a killed worker leaves half-done, on real SQLite.

Each test writes the study as a killed worker or a worker cut off from the database leaves it
(a stale FAIL with no retry, a retry of a trial beyond the target, two retries of one trial),
then runs the real loop, ``work``, with a fake objective that trains nothing. The loop must end
with exactly ``--trials`` finished trials, every killed configuration within them retried once,
and nothing left WAITING.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import study_toml
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.storage import heartbeat, optuna_compat, record
from cifar_hpo.study import worker
from cifar_hpo.study.spec import StudySpec, load_spec

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, as the other workers


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trials: int) -> tuple[StudySpec, str, optuna.Study, list[int]]:
    """A study of ``trials`` on SQLite and a fake objective; returns the spec, URL, study and the numbers it ran."""
    f = tmp_path / "s.toml"
    f.write_text(study_toml(name="s", trials=trials))
    spec = load_spec(str(f))
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = optuna.create_study(study_name="s", storage=storage.open_storage(url), direction="maximize")
    ran: list[int] = []

    def train_nothing(trial: optuna.Trial, ctx: object) -> float:
        ran.append(trial.number)
        trial.suggest_float("x", 0, 1)
        return 0.5

    monkeypatch.setattr(worker, "objective", train_nothing)
    return spec, url, study, ran


def _work(spec: StudySpec, url: str, tmp_path: Path) -> None:
    worker.work(spec, url, tmp_path / "results", None, st=storage.open_storage(url), seed=0)


def _complete(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, 0.5)
    return trial


def _running(study: optuna.Study) -> optuna.Trial:
    """A trial another worker is training (it sends heartbeats)."""
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    return trial


def _failed_as_stale(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """A killed worker's trial, failed as stale by a worker that was itself killed before adding the retry."""
    trial = _running(study)
    st = optuna_compat.study_storage(study)
    record.write_failure((st, trial._trial_id), record.FailKind.STALE, "no heartbeat for 60s (its worker was killed); retried")
    st.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return copy.deepcopy(st.get_trial(trial._trial_id))


def _retry(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    """The retry a worker adds after failing ``failed`` as stale (two workers may both add one)."""
    heartbeat.retry_callback()(study, copy.deepcopy(failed))


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _retries_of(study: optuna.Study, number: int) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if (t.system_attrs.get("retry_history") or [None])[-1] == number]


def test_a_stale_fail_awaiting_its_retry_holds_its_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a trial failed as stale whose retry was not added yet did not count, so a new
    # configuration could start in its place; with the retry added later, one trial too many.
    _, _, study, _ = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    _failed_as_stale(study)
    assert worker._count_blocking(study, 2) == 2


def test_a_killed_trial_keeps_its_place_while_its_retry_is_numbered_above(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A new trial (#2) was created; before its check, a killed trial (#1) was failed as stale and its
    # retry added (#3). Before: #2's check counted neither #1 (FAIL) nor #3 (numbered above it), so
    # #2 ran, and so did #3 (retries were exempt): 3 finished for a target of 2.
    _, _, study, _ = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    running = _running(study)
    new = study.ask()
    st = optuna_compat.study_storage(study)
    record.write_failure((st, running._trial_id), record.FailKind.STALE, "no heartbeat for 60s; retried")
    st.set_trial_state_values(running._trial_id, TrialState.FAIL)
    _retry(study, st.get_trial(running._trial_id))
    assert worker._count_blocking(study, new.number) == 2


def test_a_killed_workers_half_done_retry_is_finished_and_no_new_configuration_takes_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker that failed #1 as stale was killed before adding its retry. Before: the loop started a
    # new configuration (#2) in its place and ended the study at 2 finished with #1 never retried
    # (the re-queue after GRACE_PERIOD came too late): `trials_lost` 1.
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    killed = _failed_as_stale(study)
    _work(spec, url, tmp_path)
    assert len(_finished(study)) == 2
    retries = _retries_of(study, killed.number)
    assert [t.state for t in retries] == [TrialState.COMPLETE] and retries[0].params == killed.params
    assert ran == [retries[0].number]  # the retry, and no new configuration
    assert not [t for t in study.get_trials() if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_the_retry_of_a_trial_beyond_the_target_stands_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # #2 was created when the study's two slots were held (#0 finished, #1 training elsewhere); its
    # worker lost the database (or was killed) before the check that would have failed it as surplus,
    # so it was failed as stale and re-queued (#3). Before: a retry skipped that check, #3 ran, and
    # once #1 finished the study had 3 finished trials for a target of 2 (the PostgreSQL restart soak).
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    other = _running(study)
    _retry(study, _failed_as_stale(study))

    def other_worker_finishes(seconds: float) -> None:  # while this worker waits on #1
        if optuna_compat.study_storage(study).get_trial(other._trial_id).state == TrialState.RUNNING:
            study.tell(other, 0.5)

    monkeypatch.setattr(worker, "time", SimpleNamespace(time=__import__("time").time, sleep=other_worker_finishes))
    _work(spec, url, tmp_path)
    other_worker_finishes(0)
    assert ran == [] and len(_finished(study)) == 2
    retry = study.get_trials()[3]
    assert retry.state == TrialState.FAIL and record.read(retry).fail_kind is record.FailKind.SURPLUS


def test_a_surplus_trial_prints_one_line_and_no_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # The same half-done retry beyond the target: it stands down (SurplusTrial), which Optuna logged as a failure
    # with its traceback (about 20 lines; seen in the three-workers test under load), beside the worker's own line.
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # what `run` sets
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    other = _running(study)
    _retry(study, _failed_as_stale(study))

    def other_worker_finishes(seconds: float) -> None:
        if optuna_compat.study_storage(study).get_trial(other._trial_id).state == TrialState.RUNNING:
            study.tell(other, 0.5)

    monkeypatch.setattr(worker, "time", SimpleNamespace(time=__import__("time").time, sleep=other_worker_finishes))
    capfd.readouterr()
    _work(spec, url, tmp_path)
    out, err = capfd.readouterr()
    assert "trial #3 FAILED: surplus: the study already had enough finished or running trials" in out
    assert "Traceback" not in err and "SurplusTrial" not in err, err


def test_no_second_retry_of_one_trial_is_left_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two workers re-queued killed #1 at the same moment (#2, #3). Before: #2 ran, the study was done
    # and the loop ended with #3 WAITING (`waiting_left` 1).
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    killed = _failed_as_stale(study)
    _retry(study, killed)
    _retry(study, killed)
    _work(spec, url, tmp_path)
    assert ran == [2] and len(_finished(study)) == 2
    spare = study.get_trials()[3]
    assert spare.state == TrialState.FAIL and record.read(spare).fail_reason == "surplus: a second retry of the same trial, #2 is the retry"


def test_a_study_that_is_done_retries_a_killed_trial_left_without_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check that ends the study repairs what a killed worker left half-done: the stale FAIL gets
    # its retry now (no grace period). Here #1 was beyond the target (1): its retry stands down as
    # surplus, so the record says why it was not run. Before: the loop ended with #1 never retried.
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=1)
    _complete(study)
    killed = _failed_as_stale(study)
    _work(spec, url, tmp_path)
    assert ran == [] and len(_finished(study)) == 1
    retries = _retries_of(study, killed.number)
    assert len(retries) == 1 and retries[0].state == TrialState.FAIL
    assert record.read(retries[0]).fail_reason == "surplus: the study already had enough finished or running trials"
    assert not [t for t in study.get_trials() if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_the_retry_of_a_second_retry_killed_before_it_stood_down_stands_down_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed #1 was re-queued twice (#2, #3). #2 is training on another worker; #3 was taken, and its
    # worker killed before it stood down, so #3 was failed as stale and re-queued (#4). Before: #4 did
    # not count as a second retry (it retries #3, not #1) and ran beside #2: #1's configuration
    # finished twice, 3 trials for a target of 2.
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=2)
    _complete(study)
    killed = _failed_as_stale(study)
    _retry(study, killed)
    _retry(study, killed)
    first, second = study.ask(), study.ask()  # #2 on the other worker; #3 on the worker that is killed
    st = optuna_compat.study_storage(study)
    record.write_failure((st, second._trial_id), record.FailKind.STALE, "no heartbeat for 60s; retried")
    st.set_trial_state_values(second._trial_id, TrialState.FAIL)
    _retry(study, st.get_trial(second._trial_id))

    def other_worker_finishes(seconds: float) -> None:
        if st.get_trial(first._trial_id).state == TrialState.RUNNING:
            study.tell(first, 0.5)

    monkeypatch.setattr(worker, "time", SimpleNamespace(time=__import__("time").time, sleep=other_worker_finishes))
    _work(spec, url, tmp_path)
    other_worker_finishes(0)
    assert ran == [] and len(_finished(study)) == 2
    assert record.read(study.get_trials()[4]).fail_reason == "surplus: a second retry of the same trial, #2 is the retry"


def test_a_study_that_is_done_leaves_no_trial_running_beyond_its_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # #1 was created when the study already had its one trial; its worker was killed before the check
    # that fails such a trial as surplus. Before: the study ended with #1 RUNNING (`zombies_left` 1)
    # until it went stale, and then nobody ran the study again to fail it.
    spec, url, study, ran = _setup(tmp_path, monkeypatch, trials=1)
    _complete(study)
    _running(study)
    _work(spec, url, tmp_path)
    assert ran == [] and len(_finished(study)) == 1
    beyond = study.get_trials()[1]
    assert beyond.state == TrialState.FAIL and record.read(beyond).fail_kind is record.FailKind.SURPLUS
