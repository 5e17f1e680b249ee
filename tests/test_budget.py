"""A study's compute budget: parsing, the account read from the trials, what a worker may still start."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from optuna.trial import TrialState

from cifar_hpo.errors import UserError
from cifar_hpo.study import budget


@pytest.mark.parametrize(("text", "seconds"), [("90m", 5400), ("2h", 7200), ("1.5h", 5400), ("45s", 45), ("1d", 86400), (" 6 min ", 360)])
def test_durations(text: str, seconds: float) -> None:
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "h", "-5m", "0m", "2 hours", "1e3s", "400d", "nan h"])
def test_bad_durations_are_one_line(text: str) -> None:
    with pytest.raises(UserError, match="--budget"):
        budget.parse_duration(text)


def _trial(state: TrialState, *, wall_s: float | None = None, epochs_run: int | None = None, resumed: int | None = None,
           seconds: float = 10.0) -> optuna.trial.FrozenTrial:  # fmt: skip
    attrs = {k: v for k, v in (("wall_s", wall_s), ("epochs_run", epochs_run), ("resumed_from_epoch", resumed)) if v is not None}
    start = None if state == TrialState.WAITING else dt.datetime.now() - dt.timedelta(seconds=seconds)
    end = None if start is None or state == TrialState.RUNNING else start + dt.timedelta(seconds=seconds)
    return optuna.trial.FrozenTrial(
        number=0, state=state, value=0.5 if state == TrialState.COMPLETE else None, datetime_start=start, datetime_complete=end,
        params={}, distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=0,
    )  # fmt: skip


class _Study:
    def __init__(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        self.trials = trials

    def get_trials(self, deepcopy: bool = False) -> list[optuna.trial.FrozenTrial]:
        return self.trials


def test_the_account_sums_every_trial_and_reserves_what_running_trials_still_need() -> None:
    trials = [
        _trial(TrialState.COMPLETE, wall_s=40.0, epochs_run=4),  # 10 s per epoch
        _trial(TrialState.PRUNED, wall_s=10.0, epochs_run=1),
        _trial(TrialState.COMPLETE, wall_s=20.0, epochs_run=4, resumed=2),  # a retry: 2 epochs of its own
        _trial(TrialState.FAIL, seconds=5.0),  # killed: charged start to end
        _trial(TrialState.RUNNING, seconds=12.0),  # running: charged so far, and 4 * 10 - 12 more reserved
        _trial(TrialState.WAITING),
    ]
    acc = budget.account(_Study(trials), budget_s=200.0, epochs=4)  # type: ignore[arg-type]
    assert acc.per_epoch_s == pytest.approx(70.0 / 7)
    assert acc.spent_s == pytest.approx(40 + 10 + 20 + 5 + 12, abs=0.5)
    assert acc.committed_s == pytest.approx(40 - 12, abs=0.5)
    free = 200 - acc.spent_s - acc.committed_s  # about 85 s: two trials of 40 s fit, three do not
    assert acc.affords(4) and acc.affords(8) and not acc.affords(9)
    assert free == pytest.approx(85, abs=1)
    assert acc.line().startswith("budget 3m20s: spent 1m27s of device time, 1m53s left")


def test_before_any_measurement_a_trial_starts_while_anything_is_left() -> None:
    acc = budget.account(_Study([_trial(TrialState.FAIL, seconds=3.0)]), budget_s=10.0, epochs=100)  # type: ignore[arg-type]
    assert acc.per_epoch_s is None and acc.affords(100)
    spent = budget.account(_Study([_trial(TrialState.FAIL, seconds=30.0)]), budget_s=10.0, epochs=1)  # type: ignore[arg-type]
    assert spent.left_s == 0 and not spent.affords(1)


def test_two_processes_share_one_budget_and_a_rerun_starts_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from conftest import make_image_folder, study_toml

    from cifar_hpo.storage import record

    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_train=20, n_test=4)
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(study_toml(name="tiny", epochs=2, trials=500))
    db = f"sqlite:///{tmp_path}/db.sqlite3"
    cmd = [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(study_file), "--data", str(folder), "--device", "cpu",
           "--storage", db, "--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--budget", "10s"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("not enough for another trial" in o or "budget left cannot pay" in o for o in outs), outs
    study = optuna.load_study(study_name="tiny", storage=db)
    trials = study.get_trials()
    spent = sum(record.device_seconds(t) for t in trials)
    longest = max(record.device_seconds(t) for t in trials)
    assert 10.0 - longest <= spent <= 10.0 + 1.05 * longest, (spent, longest, len(trials))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "nothing to do: the budget left cannot pay for another trial" in again.stdout
    assert len(optuna.load_study(study_name="tiny", storage=db).get_trials()) == len(trials)  # nothing started
