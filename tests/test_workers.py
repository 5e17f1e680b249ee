"""`cifar-hpo run --workers K`: K processes on one storage, exact trial counts, atomic hand-out of re-queued trials.

Real runs on tiny synthetic data, in subprocesses, against SQLite and (marked ``postgres``)
the PostgreSQL server at 127.0.0.1:5432. Each PostgreSQL test uses its own study name and
deletes it afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.storage import heartbeat

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_WITH_PASSWORD = "postgresql+psycopg://postgres:s3cret@127.0.0.1:5432/test"  # trust auth here: any password connects

EPOCH_LINE = re.compile(r"^\[w(\d+)\] trial \d+/\d+ \(#(\d+)\) epoch", re.M)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c", "d"), n_train=20, n_test=4)


def study_file(tmp_path: Path, *, epochs: int = 2, name: str | None = None) -> Path:
    """A tiny study file; its study name is unique unless given."""
    name = name or f"w{uuid.uuid4().hex[:10]}"
    f = tmp_path / f"{name}.toml"
    f.write_text(study_toml(name=name, epochs=epochs, trials=4))
    return f


def run_cli(tmp_path: Path, folder: Path, study: Path, trials: int, workers: int, *, url: str, via_env: bool = False,
            env_extra: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``cifar-hpo run`` in a subprocess (the way a person starts it); output captured."""
    env = {**os.environ, **(env_extra or {})}
    env.pop(storage.ENV_VAR, None)
    where = ["--storage", url]
    if via_env:
        env[storage.ENV_VAR], where = url, []
    cmd = [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(study), "--data", str(folder), "--trials", str(trials),
           "--workers", str(workers), "--device", "cpu", "--results", str(tmp_path / "results"),
           "--cache-dir", str(tmp_path / "cache"), *where]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def trained_by(output: str) -> dict[int, set[int]]:
    """Trial number -> indices of the workers whose epoch lines name it."""
    seen: dict[int, set[int]] = {}
    for worker, number in EPOCH_LINE.findall(output):
        seen.setdefault(int(number), set()).add(int(worker))
    return seen


def delete_study(url: str, name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


def test_three_workers_on_sqlite_finish_exactly_n_without_lock_errors(tmp_path: Path, folder: Path) -> None:
    # Three writers on two cores: the hardest case for SQLite's single writer lock.
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    f = study_file(tmp_path)
    done = run_cli(tmp_path, folder, f, trials=5, workers=3, url=url)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "database is locked" not in output
    assert "Traceback" not in output
    trials = optuna.load_study(study_name=f.stem, storage=url).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 5
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # Every trial was trained by one worker, and the work was shared.
    by = trained_by(output)
    assert set(by) >= {t.number for t in finished}
    assert all(len(who) == 1 for who in by.values()), by
    assert len(set().union(*by.values())) >= 2
    # Each CPU worker had its share of the cores (one of two here), and said which pid to signal.
    if len(os.sched_getaffinity(0)) == 2:
        assert all(t.user_attrs["device"].endswith("1 cores)") for t in finished), [t.user_attrs["device"] for t in finished]
    # Not anchored at a line start: once in CI (not reproduced in 8 runs here) the third worker's line, present in the
    # process's output since its trials were there, did not begin a line of the captured output.
    assert sorted(re.findall(r"\[w(\d)\] worker pid \d+ on ", output)) == ["0", "1", "2"]


@pytest.mark.slow
def test_two_workers_resume_to_a_larger_count(tmp_path: Path, folder: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    f = study_file(tmp_path)
    for trials in (3, 6):
        done = run_cli(tmp_path, folder, f, trials=trials, workers=2, url=url)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "database is locked" not in done.stdout + done.stderr
        states = [t.state for t in optuna.load_study(study_name=f.stem, storage=url).get_trials()]
        assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == trials


@pytest.mark.postgres
def test_workers_on_postgres_never_print_the_password(tmp_path: Path, folder: Path) -> None:
    f = study_file(tmp_path)
    try:
        done = run_cli(tmp_path, folder, f, trials=3, workers=2, url=PG_WITH_PASSWORD)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert "s3cret" not in output and "postgres:***@127.0.0.1" in output
        trials = optuna.load_study(study_name=f.stem, storage=PG).get_trials()
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
        assert all(len(who) == 1 for who in trained_by(output).values())
        # The status tables, the URL from the environment, and an error about the server.
        base = [sys.executable, "-m", "cifar_hpo.cli", "status"]
        env = {**os.environ, storage.ENV_VAR: PG_WITH_PASSWORD}
        for cmd, environ in (
            ([*base, "--storage", PG_WITH_PASSWORD], None),
            ([*base, "--study", f.stem, "--storage", PG_WITH_PASSWORD], None),
            ([*base, "--study", f.stem], env),
            ([*base, "--storage", PG_WITH_PASSWORD.replace("/test", "/no_such_db")], None),
        ):
            shown = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=environ)
            text = shown.stdout + shown.stderr
            assert "s3cret" not in text, text
            assert "postgres:***@" in text, text
        assert "does not exist" in text and shown.returncode == 2 and text.count("\n") == 1
    finally:
        delete_study(PG, f.stem)


# ------------------------------------------------------------- a re-queued trial goes to one worker


def _race(url: str, name: str, barrier: Any, out: Any) -> None:
    """One contender: fail stale trials, then take WAITING trials until a fresh one comes."""
    import warnings

    import optuna

    from cifar_hpo import storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": ask/tell on purpose
    study = optuna.load_study(study_name=name, storage=storage.open_storage(url))
    barrier.wait()
    optuna.storages.fail_stale_trials(study)  # every contender at once: each dead trial is failed once
    barrier.wait()
    got, errors = [], []
    while True:
        trial = study.ask()
        if storage.retried_trial_number(trial) is None:
            study.tell(trial, state=TrialState.FAIL)  # a fresh trial: no retry left to take
            break
        got.append(trial.number)
        try:
            study.tell(trial, 1.0)
        except Exception as e:  # another process took the same trial and finished it first
            errors.append(f"#{trial.number}: {e}")
    out.put((got, errors))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_requeued_trial_is_run_by_exactly_one_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    # Trials whose workers died (heartbeats stopped) are failed and re-queued by four processes
    # at once, then handed out to them: each dead trial gets one retry, each retry one taker.
    # (On SQLite this needs BEGIN IMMEDIATE: without it two processes took the same retry.)
    monkeypatch.setenv("CIFAR_HPO_HEARTBEAT", "1")
    monkeypatch.setenv("CIFAR_HPO_GRACE", "1")
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    url = f"sqlite:///{tmp_path}/race.db" if backend == "sqlite" else PG
    name = f"race-{uuid.uuid4().hex[:10]}"
    dead = 24
    try:
        st = storage.open_storage(url)
        study = optuna.create_study(study_name=name, storage=st)
        for _ in range(dead):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            st.record_heartbeat(trial._trial_id)  # ...then the worker "dies"
        time.sleep(2.2)  # past the 1 s grace period (SQLite stamps heartbeats to the second)
        ctx = multiprocessing.get_context("spawn")
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(url, name, barrier, out)) for _ in range(4)]
        for p in procs:
            p.start()
        taken = []
        deadline = time.time() + 180
        while len(taken) < len(procs) and time.time() < deadline:
            try:
                taken.append(out.get(timeout=1))
            except queue.Empty:
                assert not [p.exitcode for p in procs if p.exitcode not in (None, 0)], "a contender crashed (see stderr)"
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        trials = study.get_trials()
        retries = [t for t in trials if "failed_trial" in t.system_attrs]
        assert sorted(t.system_attrs["retry_history"][-1] for t in retries) == list(range(dead))  # each retried once
        assert [e for _, errors in taken for e in errors] == []
        flat = [n for got, _ in taken for n in got]
        assert sorted(flat) == sorted(t.number for t in retries)  # each retry taken once, by one process
        assert all(t.state == TrialState.COMPLETE for t in retries)
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    finally:
        if backend == "postgres":
            delete_study(PG, name)
