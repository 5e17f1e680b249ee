"""A full disk, or a read-only results folder or database file, loses nothing.

Whichever write fails (a trial's snapshot, a checkpoint artifact, a learning-curve PNG, the study
database, spec.json, the decoded-array cache), `run` stops with one line that names the file
system and says to free space (or make it writable) and run the same command again; no partial
or temp file is left, the database passes ``PRAGMA quick_check``, the trial that could not be
saved is re-queued (or, where the database itself is full, retried once stale), and the rerun
finishes the exact total.

Each test mounts its own small tmpfs (or a read-only bind mount) under its tmp_path and unmounts it
at teardown; where mounting is not allowed (not root, a container without the capability) it skips.
"""

from __future__ import annotations

import errno
import gc
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.storage import heartbeat, record
from cifar_hpo.storage.refused import WriteRefused, mount_point, refusal, refusing
from cifar_hpo.study import objective, worker

TRIALS = 2


class Mounts:
    """Mounts made by one test; `undo` unmounts them all, last first."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, where: Path, size: str) -> Path:
        """A tmpfs of ``size`` (e.g. "4m") at ``where``."""
        where.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        self.points.append(where)
        return where

    def read_only_bind(self, path: Path) -> Path:
        """``path`` (a file or folder) bind-mounted read-only over itself: as root, a chmod stops no write."""
        self._mount("--bind", str(path), str(path))
        self.points.append(path)
        self.remount(path, "bind,ro")
        return path

    def remount(self, where: Path, options: str) -> None:
        gc.collect()  # the engines of the runs so far, in this process: a file open for writing keeps a mount read-write
        self._mount("-o", f"remount,{options}", str(where), skip=False)

    def unmount(self, where: Path) -> None:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # still open somewhere: detach it
        self.points.remove(where)

    def undo(self) -> None:
        for where in reversed(list(self.points)):
            self.unmount(where)

    @staticmethod
    def _mount(*args: str, skip: bool = True) -> None:
        """``mount args``; where that is not allowed, skip the test (``skip``) or fail it."""
        try:
            done = subprocess.run(["mount", *args], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if done.returncode != 0 and skip:
            pytest.skip(f"cannot mount here (needs root where mounting is allowed): {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.undo()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c"), n_train=16, n_test=4)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots after every epoch; a trial left RUNNING by a full database is stale after a second, not a minute."""
    monkeypatch.setenv("CIFAR_HPO_SNAPSHOT_S", "0")
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    monkeypatch.setattr(worker, "POLL_S", 0.2)


def _fill(where: Path, leave: int = 0) -> Path:
    """Write a filler file into the file system at ``where`` until at most ``leave`` bytes are free; returns it."""
    filler = where / "filler"
    st = os.statvfs(where)
    todo = max(0, st.f_bavail * st.f_frsize - leave)
    block = b"\0" * 65536
    with open(filler, "ab", buffering=0) as f:
        try:
            while todo > 0:
                todo -= f.write(block[: min(todo, len(block))])
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def _args(tmp_path: Path, folder: Path, *, results: Path, db: Path | None = None, cache: Path | None = None) -> list[str]:
    study = tmp_path / "tiny.toml"
    study.write_text(study_toml(epochs=2, trials=TRIALS, pruner="none"))
    storage = ["--storage", f"sqlite:///{db}"] if db is not None else []
    return ["run", "--study", str(study), "--data", str(folder), "--trials", str(TRIALS), "--device", "cpu",
            "--results", str(results), "--cache-dir", str(cache or tmp_path / "cache"), *storage]  # fmt: skip


def _stopped(capsys: pytest.CaptureFixture[str], code: int, *fragments: str) -> str:
    """The one line ``run`` stopped with (exit 2), holding every fragment."""
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("cifar-hpo: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def _no_partial(*roots: Path) -> None:
    """No temp file of an interrupted write anywhere under ``roots``."""
    left = [p for root in roots for p in root.rglob(".*.tmp")]
    assert not left, left


def _db_ok(db: Path) -> None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA quick_check").fetchone() == ("ok",)
    finally:
        con.close()


def _trials(db: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}").get_trials()


def _not_saved_and_requeued(db: Path, fragment: str) -> None:
    """Trial #0 failed because it could not be saved, and waits for its retry; nothing counted as finished."""
    trials = _trials(db)
    rec = record.read(trials[0])
    assert trials[0].state == TrialState.FAIL and rec.fail_kind is record.FailKind.NOT_SAVED, rec.fail_reason
    assert rec.fail_reason is not None and fragment in rec.fail_reason
    assert [t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING] == [0]
    assert not [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]


def _rerun_finishes(args: list[str], db: Path) -> list[optuna.trial.FrozenTrial]:
    """The same command again finishes exactly ``TRIALS`` trials and leaves none running or waiting."""
    assert cli.main(args) == 0
    _db_ok(db)
    trials = _trials(db)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == TRIALS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return trials


# ---------------------------------------------------------------- no space left


def test_no_space_for_a_snapshot(tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]) -> None:
    results = mounts.tmpfs(tmp_path / "results", "4m")
    filler = _fill(results, leave=128 * 1024)  # spec.json fits, a snapshot (model and optimizer, ~0.7 MB) does not
    db = tmp_path / "db.sqlite3"
    args = _args(tmp_path, folder, results=results, db=db)
    line = _stopped(capsys, cli.main(args), f"no space left on {results.resolve()} (writing {results}", "last.pt",
                    "free space there and run the same command again")  # fmt: skip
    _no_partial(results)
    _db_ok(db)
    _not_saved_and_requeued(db, f"no space left on {results.resolve()}")
    assert "Errno" not in line
    filler.unlink()
    _rerun_finishes(args, db)


def test_no_space_for_a_checkpoint_artifact(tmp_path: Path, folder: Path, mounts: Mounts, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    db = tmp_path / "db" / "db.sqlite3"
    artifacts = mounts.tmpfs(tmp_path / "db" / "artifacts", "4m")  # the artifact store, beside the database
    save_best = objective._save_best
    fillers: list[Path] = []

    def full_then_save(*a, **k):  # type: ignore[no-untyped-def]
        fillers.append(_fill(artifacts))  # the learning curve is stored; now the disk is full
        save_best(*a, **k)

    monkeypatch.setattr(objective, "_save_best", full_then_save)
    args = _args(tmp_path, folder, results=tmp_path / "results", db=db)
    _stopped(capsys, cli.main(args), f"no space left on {artifacts.resolve()} (writing {artifacts}")
    _no_partial(artifacts)
    _db_ok(db)
    _not_saved_and_requeued(db, f"no space left on {artifacts.resolve()}")
    assert len([p for p in artifacts.iterdir() if p != fillers[0]]) == 1  # trial #0's curve, whole
    monkeypatch.setattr(objective, "_save_best", save_best)
    fillers[0].unlink()
    trials = _rerun_finishes(args, db)
    assert any(record.read(t).checkpoint_artifact_id for t in trials)


def test_no_space_for_a_learning_curve(tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db" / "db.sqlite3"
    artifacts = mounts.tmpfs(tmp_path / "db" / "artifacts", "4m")
    filler = _fill(artifacts)  # the curve PNG is the first artifact a trial writes
    args = _args(tmp_path, folder, results=tmp_path / "results", db=db)
    _stopped(capsys, cli.main(args), f"no space left on {artifacts.resolve()} (writing {artifacts}")
    _no_partial(artifacts)
    assert [p.name for p in artifacts.iterdir()] == ["filler"]
    _db_ok(db)
    _not_saved_and_requeued(db, f"no space left on {artifacts.resolve()}")
    filler.unlink()
    _rerun_finishes(args, db)


def test_no_space_to_create_the_database(tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]) -> None:
    results = mounts.tmpfs(tmp_path / "results", "8m")
    filler = _fill(results)
    args = _args(tmp_path, folder, results=results)  # the default database, results/cifar_hpo.db
    _stopped(capsys, cli.main(args), f"no space left on {results.resolve()} (writing the study database {results / 'cifar_hpo.db'}")
    assert [p.name for p in results.iterdir()] == ["filler"]  # no 0-byte database, no -wal or -shm
    filler.unlink()
    _rerun_finishes(args, results / "cifar_hpo.db")


def test_the_database_fills_during_a_trial(tmp_path: Path, folder: Path, mounts: Mounts, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    where = mounts.tmpfs(tmp_path / "db", "8m")
    mounts.tmpfs(where / "artifacts", "8m")  # artifacts apart: here only the database runs out of space
    db = where / "db.sqlite3"
    progress = objective._progress
    fillers: list[Path] = []

    def fill_in_trial_1(ctx, trial, n_done, r, started):  # type: ignore[no-untyped-def]
        progress(ctx, trial, n_done, r, started)
        if trial.number == 1 and r.epoch == 1 and not fillers:
            fillers.append(_fill(where))

    monkeypatch.setattr(objective, "_progress", fill_in_trial_1)
    args = _args(tmp_path, folder, results=tmp_path / "results", db=db)
    line = _stopped(capsys, cli.main(args), f"no space left on {where.resolve()} (writing the study database {db})")
    assert "lost the database" not in line + capsys.readouterr().out  # not waited for as a lost connection
    _db_ok(db)
    trials = _trials(db)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]  # #1 could not even be marked
    monkeypatch.setattr(objective, "_progress", progress)
    fillers[0].unlink()
    trials = _rerun_finishes(args, db)
    assert trials[1].state == TrialState.FAIL and record.read(trials[1]).fail_kind is record.FailKind.STALE
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert record.read(retry).resumed_from_epoch == 1  # from the snapshot the full database did not touch


def test_no_space_for_spec_json(tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]) -> None:
    results = mounts.tmpfs(tmp_path / "results", "8m")
    filler = _fill(results)
    db = tmp_path / "db.sqlite3"
    args = _args(tmp_path, folder, results=results, db=db)
    _stopped(capsys, cli.main(args), f"no space left on {results.resolve()} (writing {results / 'tiny' / 'spec.json'})")
    _no_partial(results)
    filler.unlink()
    _rerun_finishes(args, db)


def test_no_space_for_the_decoded_array_cache(tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]) -> None:
    cache = mounts.tmpfs(tmp_path / "cache", "4m")
    filler = _fill(cache)
    db = tmp_path / "db.sqlite3"
    args = _args(tmp_path, folder, results=tmp_path / "results", db=db, cache=cache)
    _stopped(capsys, cli.main(args), f"no space left on {cache.resolve()} (writing {cache}")
    _no_partial(cache)
    assert not db.exists()  # stopped before the database was made
    filler.unlink()
    _rerun_finishes(args, db)


# ---------------------------------------------------------------- read-only


def test_a_read_only_database_file(tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "db.sqlite3"
    args = _args(tmp_path, folder, results=tmp_path / "results", db=db)
    assert cli.main([*args, "--trials", "1"]) == 0  # the last --trials counts
    capsys.readouterr()
    mounts.read_only_bind(db)
    _stopped(capsys, cli.main(args), f"cannot write the study database {db}: {db} is mounted read-only",
             "make it writable or pass another --storage, and run the same command again")  # fmt: skip
    _db_ok(db)
    assert [t.state for t in _trials(db)] == [TrialState.COMPLETE]  # as it was
    mounts.unmount(db)
    _rerun_finishes(args, db)


@pytest.mark.parametrize("database_inside", [False, True], ids=["database-elsewhere", "database-inside"])
def test_a_read_only_results_folder_after_the_study_was_created(
    database_inside: bool, tmp_path: Path, folder: Path, mounts: Mounts, capsys: pytest.CaptureFixture[str]
) -> None:
    results = mounts.tmpfs(tmp_path / "results", "8m")
    db = results / "cifar_hpo.db" if database_inside else tmp_path / "db.sqlite3"
    args = _args(tmp_path, folder, results=results, db=None if database_inside else db)
    assert cli.main([*args, "--trials", "1"]) == 0
    capsys.readouterr()
    mounts.remount(results, "ro")
    what = f"the study database {db}" if database_inside else str(results / "tiny" / "spec.json")
    _stopped(capsys, cli.main(args), f"cannot write {what}: {results.resolve()} is mounted read-only", "run the same command again")
    mounts.remount(results, "rw")  # SQLite cannot open a WAL database without its -shm file in a read-only folder
    _db_ok(db)
    assert [t.state for t in _trials(db)] == [TrialState.COMPLETE]  # as it was
    _rerun_finishes(args, db)


# ---------------------------------------------------------------- what counts as a refused write


def test_a_permission_error_is_a_refused_write_only_while_writing(tmp_path: Path) -> None:
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))
    assert refusal(denied) is None  # reading a file one may not read is not a full or read-only disk
    with pytest.raises(WriteRefused, match=r"cannot write .*x: Permission denied; make it writable"), refusing(tmp_path / "x"):
        raise denied
    assert refusal(RuntimeError("while saving")) is None
    full = refusal(_raised_from(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "y"))))
    assert full is not None and isinstance(full, OSError)
    assert str(full).startswith(f"no space left on {mount_point(tmp_path)} (writing {tmp_path / 'y'}); free space there")


def _raised_from(cause: BaseException) -> BaseException:
    try:
        raise RuntimeError("while saving") from cause
    except RuntimeError as e:
        return e
