"""Trial folders belong to a study: ``results/<study>/<uid>/trials/<n>/``, keyed by the study's identity in its database.

Two studies of one name in two databases, sharing one ``--results`` folder, used to share
``results/<study>/trials/<n>/``: each run deleted the other's resumable snapshots (a new trial cleared
a folder whose snapshot was not its own). The previous version's folders are still resumed from
(tests/test_compat.py) and, when they belong to another study, left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.storage import checkpoint
from cifar_hpo.study import objective


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c"), n_train=16, n_test=4)


def _run(tmp_path: Path, folder: Path, db: str, trials: int) -> int:
    study = tmp_path / "tiny.toml"
    if not study.exists():
        study.write_text(study_toml(epochs=2, trials=trials, pruner="none"))
    return cli.main(["run", "--study", str(study), "--data", str(folder), "--trials", str(trials), "--device", "cpu",
                     "--storage", f"sqlite:///{tmp_path}/{db}", "--results", str(tmp_path / "results"),
                     "--cache-dir", str(tmp_path / "cache")])  # fmt: skip


def _study(tmp_path: Path, db: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/{db}")


@pytest.fixture
def interrupt_trial_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in trial #1 right after its first epoch's snapshot (taken after every epoch)."""
    monkeypatch.setenv("CIFAR_HPO_SNAPSHOT_S", "0")
    original = objective._progress

    def progress(ctx, trial, n_done, r, started):  # type: ignore[no-untyped-def]
        original(ctx, trial, n_done, r, started)
        if trial.number == 1 and r.epoch == 1:  # its retry is trial #2
            raise KeyboardInterrupt

    monkeypatch.setattr(objective, "_progress", progress)


def test_interleaved_runs_of_two_databases_never_delete_each_others_snapshots(
    tmp_path: Path, folder: Path, interrupt_trial_1: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each study: trial 0 completes, trial 1 is interrupted after epoch 1 and re-queued, its snapshot kept.
    assert _run(tmp_path, folder, "a.sqlite3", 2) == 130
    assert _run(tmp_path, folder, "b.sqlite3", 2) == 130  # the old code deleted a's trials/1 here
    a, b = _study(tmp_path, "a.sqlite3"), _study(tmp_path, "b.sqlite3")
    snapshots = [objective.trial_folder(tmp_path / "results", s, 1) / "last.pt" for s in (a, b)]
    assert all(s.is_file() for s in snapshots)
    capsys.readouterr()
    for db in ("a.sqlite3", "b.sqlite3"):  # each resumes its own snapshot, the other's untouched
        assert _run(tmp_path, folder, db, 2) == 0
        assert "resuming trial 1 from epoch 1" in capsys.readouterr().out
        retry = next(t for t in _study(tmp_path, db).get_trials() if t.system_attrs.get("failed_trial") == 1)
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 1
    assert not any(s.exists() for s in snapshots)  # each removed by its own study once its trial finished


def test_a_run_leaves_another_studys_files_alone(tmp_path: Path, folder: Path) -> None:
    """Snapshots of the previous layout that name another study, and another study's temp files, survive a run."""
    results = tmp_path / "results"
    foreign = {"study": "tiny", "study_uid": "another-database", "trial": 0, "split_hash": "x"}
    legacy = objective.legacy_trial_folder(results, "tiny", 0) / "last.pt"
    checkpoint.save({"epoch": 1, "identity": foreign}, legacy)
    nobody = objective.legacy_trial_folder(results, "tiny", 1) / "last.pt"
    checkpoint.save({"epoch": 1}, nobody)  # names no study: older than identities, never resumable
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    theirs = results / "tiny" / "anotherdatabase" / "trials" / "0" / f".last.pt.{checkpoint._HOST}-{dead.pid}-k1x2.tmp"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"partial")
    assert _run(tmp_path, folder, "db.sqlite3", 2) == 0
    assert legacy.is_file() and checkpoint.load(legacy)["identity"] == foreign  # the old code deleted it
    assert not nobody.exists()
    assert theirs.exists()  # another study's folder: not this run's to clean
    mine = objective.study_folder(results, _study(tmp_path, "db.sqlite3"))
    assert mine.parent == results / "tiny" and mine.name == _study(tmp_path, "db.sqlite3").user_attrs["uid"]


def test_a_study_uid_is_one_safe_folder_name() -> None:
    study = optuna.create_study(storage="sqlite:///:memory:", study_name="tiny")
    study.set_user_attr("uid", "../../etc")
    assert objective.study_folder(Path("r"), study) == Path("r/tiny/______etc")
    assert os.sep not in objective.study_folder(Path("r"), study).name


def test_a_retry_never_resumes_an_old_layout_snapshot_that_names_no_study(
    tmp_path: Path, folder: Path, interrupt_trial_1: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIFAR_HPO_SNAPSHOT_S", "3600")  # the interrupted trial #1 leaves no snapshot of its own
    assert _run(tmp_path, folder, "db.sqlite3", 2) == 130
    nobody = objective.legacy_trial_folder(tmp_path / "results", "tiny", 1) / "last.pt"
    checkpoint.save({"epoch": 1, "model_state": {}}, nobody)  # written before snapshots named their study
    assert _run(tmp_path, folder, "db.sqlite3", 2) == 0
    retry = next(t for t in _study(tmp_path, "db.sqlite3").get_trials() if t.system_attrs.get("failed_trial") == 1)
    assert retry.state == TrialState.COMPLETE and "resumed_from_epoch" not in retry.user_attrs  # trained from the start
    assert not nobody.exists()
