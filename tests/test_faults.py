"""Faults injected into real studies: SIGKILLed workers, preemption, kills mid-checkpoint, damaged databases.

The study runs are subprocesses on tiny synthetic data with a 1 s heartbeat and a 3 s grace
period (``CIFAR_HPO_HEARTBEAT`` / ``CIFAR_HPO_GRACE``) so that dead workers are noticed fast.
PostgreSQL tests (127.0.0.1:5432, database ``test``) use their own study names and delete them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import torch
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli, storage
from cifar_hpo.bench import faults
from cifar_hpo.errors import UserError
from cifar_hpo.storage import checkpoint, heartbeat, record
from cifar_hpo.study.objective import trial_folder

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
FAULT_ENV = {"CIFAR_HPO_HEARTBEAT": "1", "CIFAR_HPO_GRACE": "3", "CIFAR_HPO_SNAPSHOT_S": "0"}

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c", "d"), n_train=20, n_test=4)


def _study_file(tmp_path: Path, epochs: int) -> Path:
    name = f"f{uuid.uuid4().hex[:10]}"
    f = tmp_path / f"{name}.toml"
    f.write_text(study_toml(name=name, epochs=epochs, trials=4))
    return f


def _run_cmd(tmp_path: Path, folder: Path, study: Path, trials: int, workers: int, url: str) -> list[str]:
    return [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(study), "--data", str(folder), "--trials", str(trials),
            "--workers", str(workers), "--device", "cpu", "--storage", url, "--results", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip


def _finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _check_no_loss(trials: list[optuna.trial.FrozenTrial], target: int) -> list[optuna.trial.FrozenTrial]:
    """Exact count, nothing RUNNING or WAITING, every kill retried exactly once or accounted for; returns the killed trials.

    Accounted for without a retry (`faults.account`): a lineage killed ``MAX_RETRY`` times, given up
    by design, and one that never started training (killed before the check that found it beyond
    the target; its retry, if any, stood down as surplus).
    """
    assert len(_finished(trials)) == target
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    fate = faults.account(trials)
    assert fate["never_retried"] == 0 and fate["retried_twice"] == 0, fate
    return [t for t in trials if t.state == TrialState.FAIL and record.read(t).fail_kind in (record.FailKind.STALE, None)]


def _assert_nothing_lost(result: dict) -> None:
    """The bench's own counts of one faulted study: nothing lost, left behind or run twice, the target exact."""
    assert result["trials_lost"] == 0, result
    assert result["zombies_left"] == 0 and result["waiting_left"] == 0, result
    assert result["duplicate_runs"] == 0 and result["retried_twice"] == 0, result
    assert result["trials_finished"] == result["trials_target"], result
    assert not faults.faulty(result), result


# ------------------------------------------------------------------ SIGKILL of workers, repeatedly


@pytest.mark.slow
def test_repeated_sigkill_of_workers_loses_nothing_sqlite(tmp_path: Path) -> None:
    # Trials long enough (15 epochs) that every kill lands before the study is done.
    result = faults.measure(tmp_path, trials=5, workers=2, kills=3, epochs=15, seed=1)
    assert result["kills_injected"] == 3
    assert result["locked_errors"] == 0
    _assert_nothing_lost(result)
    url = f"sqlite:///{tmp_path}/faults.db"
    trials = optuna.load_study(study_name=result["study"], storage=url).get_trials()
    killed = _check_no_loss(trials, 5)
    assert killed, "no kill landed inside a trial"


@pytest.mark.slow
@pytest.mark.postgres
def test_repeated_sigkill_and_a_server_restart_lose_nothing_postgres(tmp_path: Path) -> None:
    # The server is restarted once mid-study: workers reconnect (or their trials are retried).
    try:
        result = faults.measure(tmp_path, url=PG, trials=5, workers=2, kills=2, epochs=15, seed=2, restart_db=True)
        assert result["db_restart"] == "restarted"
        _assert_nothing_lost(result)  # exactly 5: no trial beyond the target after the restart (seen once before the fix)
        trials = optuna.load_study(study_name=result["study"], storage=PG).get_trials()
        _check_no_loss(trials, 5)
    finally:
        faults._wait_postgres_up()
        try:
            optuna.delete_study(study_name=result["study"], storage=PG)
        except (KeyError, NameError, UnboundLocalError):
            pass


def _fake_run(seed: int, *, finished: int = 5, lost: int = 0) -> dict:
    """What `faults.measure` returns for one study, the counts a test picks."""
    return {"kills_injected": 3, "trials_target": 5, "trials_finished": finished, "trials_lost": lost, "zombies_left": 0,
            "waiting_left": 0, "trials_killed": 3, "retries": 3, "retried_twice": 0, "retries_exhausted": 0, "killed_unstarted": 0,
            "duplicate_runs": 0, "stalled": 0, "wall_s": 10.0, "study": f"faults-{seed}"}  # fmt: skip


@pytest.mark.parametrize("bad_seed", [None, 6])
def test_bench_faults_repeat_runs_one_study_per_seed_and_reports_the_totals(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad_seed: int | None
) -> None:
    # `--repeat N`: seeds seed..seed+N-1, each run's counts and their totals in the JSON; exit 1 if any run lost anything.
    seeds = []

    def measure(workdir: Path, *, seed: int, **kw: object) -> dict:
        seeds.append(seed)
        return _fake_run(seed, finished=6 if seed == bad_seed else 5, lost=int(seed == bad_seed))

    monkeypatch.setattr(faults, "measure", measure)
    monkeypatch.delenv(storage.ENV_VAR, raising=False)
    code = cli.main(["bench", "faults", "--repeat", "3", "--seed", "5", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seeds == [5, 6, 7] and report["seeds"] == "5-7"
    assert [r["study"] for r in report["per_run"]] == ["faults-5", "faults-6", "faults-7"]
    assert (report["trials_lost"], report["runs_off_target"], report["runs_faulty"]) == ((1, 1, 1) if bad_seed else (0, 0, 0))
    assert report["kills_injected"] == 9 and report["zombies_left"] == report["duplicate_runs"] == report["waiting_left"] == 0
    assert code == (1 if bad_seed else 0)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_bench_accounts_every_kill_by_lineage(tmp_path: Path) -> None:
    # Killed trials, as a study leaves them. Before, the bench counted per trial and called lost a kill
    # whose lineage finished anyway (a second retry killed before it stood down) or that never trained
    # (killed before the check that found it beyond the target).
    study = optuna.create_study(storage=storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3"), study_name="s")
    st = study._storage

    def trial(state: TrialState, reason: str | None = None, trained: bool = True, retries: list[int] | None = None) -> int:
        attrs = {"retry_history": retries, "failed_trial": retries[0]} if retries else {}
        t = optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=attrs, user_attrs={"trial_params": {}} if trained else {})
        study.add_trial(t)
        frozen = study.get_trials()[-1]
        if reason:
            record.write_failure((st, frozen._trial_id), record.classify(reason) or record.FailKind.ERROR, reason.split(": ", 1)[1])
        if state != TrialState.WAITING:
            st.set_trial_state_values(frozen._trial_id, TrialState.RUNNING)
            st.set_trial_state_values(frozen._trial_id, state, [0.5] if state == TrialState.COMPLETE else None)
        return frozen.number

    a = trial(TrialState.FAIL, "stale: killed")  # killed, retried once: fine
    trial(TrialState.COMPLETE, retries=[a])
    b = trial(TrialState.FAIL, "stale: killed")  # re-queued twice (#3, #4); #4 killed before it stood down
    trial(TrialState.COMPLETE, retries=[b])
    c = trial(TrialState.FAIL, "stale: killed", retries=[b])
    trial(TrialState.FAIL, "surplus: a second retry of the same trial, #3 is the retry", retries=[b, c])
    d = trial(TrialState.FAIL, "stale: killed", trained=False)  # killed before its surplus check
    trial(TrialState.FAIL, "surplus: the study already had enough finished or running trials", trained=False, retries=[d])
    trial(TrialState.FAIL, "stale: killed")  # killed and never retried: lost
    f = trial(TrialState.FAIL, "stale: killed")  # killed three times (MAX_RETRY 2): given up
    g = trial(TrialState.FAIL, "stale: killed", retries=[f])
    trial(TrialState.FAIL, "stale: killed", retries=[f, g])
    assert faults.account(study.get_trials()) == {"trials_killed": 8, "retries": 5, "retried_twice": 0, "retries_exhausted": 1,
                                                  "killed_unstarted": 1, "never_retried": 1}  # fmt: skip


def test_bench_faults_says_why_when_the_run_never_created_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a run that failed before creating the study (here: an unknown model) was run five times
    # more, then the bench died with a bare KeyError traceback ("Record does not exist."), no reason.
    monkeypatch.setattr(faults, "STUDY_TOML", faults.STUDY_TOML.replace('"baseline_cnn"', '"no_such_model"'))
    with pytest.raises(UserError, match=r"^`cifar-hpo run` exited 2 before it created the study: cifar-hpo: error: .*no_such_model"):
        faults.measure(tmp_path, trials=1, workers=1, kills=0)


def test_sigkill_of_one_worker_spares_the_others_and_it_is_restarted(tmp_path: Path, folder: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    f = _study_file(tmp_path, epochs=30)  # long enough trials that the kill lands inside one
    proc = subprocess.Popen(_run_cmd(tmp_path, folder, f, 4, 2, url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **FAULT_ENV}, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    try:
        pids: dict[str, int] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " worker pid " in line:
                pids[line[:4]] = int(line.split(" worker pid ")[1].split()[0])
            if "(#" in line and " epoch 3/30" in line:
                victim = line[:4]  # "[wN]"
                break
        os.kill(pids[victim], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        lines.append(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:]
    assert f"{victim} worker died (SIGKILL)" in output and "restarting the worker" in output
    survivor = "[w1]" if victim == "[w0]" else "[w0]"
    assert f"{survivor} interrupted" not in output  # the other worker's trial went on
    trials = optuna.load_study(study_name=f.stem, storage=url).get_trials()
    killed = _check_no_loss(trials, 4)
    assert len(killed) == 1
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.params == killed[0].params
    assert retry.user_attrs.get("resumed_from_epoch", 0) >= 1  # from the snapshot of the killed trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_worker_killed_before_its_first_heartbeat_leaves_no_zombie(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker killed right after taking a trial, before Optuna's heartbeat thread started (while the
    # sampler ran): Optuna never counts a RUNNING trial without a heartbeat as stale, so the study
    # waited on it for ever. Found by `bench faults --kills 10`. Both ways of taking a trial are covered.
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    study = optuna.create_study(storage=storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3"), study_name="s")
    study.enqueue_trial({"x": 0.5})
    requeued, fresh = study.ask(), study.ask()  # ...and the worker dies: no optimize(), no heartbeat thread
    assert requeued.number == 0 and fresh.number == 1
    time.sleep(2.2)  # SQLite stamps heartbeats to the second: 2 s apart is always > 1 s grace
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert sorted(t.system_attrs["failed_trial"] for t in trials[2:]) == [0, 1]  # both re-queued


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_running_trial_that_never_had_a_heartbeat_is_failed_after_orphan_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Still possible when the database was down the moment the first heartbeat was due.
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    plain = optuna.create_study(storage=url, study_name="s")  # Optuna's own storage: no first heartbeat
    plain.ask()
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    study = optuna.load_study(study_name="s", storage=storage.open_storage(url))
    monkeypatch.setattr(heartbeat, "ORPHAN_S", 60.0)
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.RUNNING  # young: its worker may be about to beat
    monkeypatch.setattr(heartbeat, "ORPHAN_S", 0.5)
    time.sleep(1.0)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[1].state == TrialState.WAITING
    assert trials[1].system_attrs["failed_trial"] == 0


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("cut", ["get_trial", "_create_new_trial"])
def test_an_outage_between_failing_a_stale_trial_and_adding_its_retry_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    # Failing a stale trial and adding its retry are two writes. Optuna's fail_stale_trials failed the
    # trial, read it back and added the retry; the database going away in between (a server restart)
    # left the trial FAIL with no retry, and no worker ever retried it: a lost trial (seen in the
    # PostgreSQL restart test of `bench faults`, under load). Here the read or the write after the FAIL
    # finds the database gone twice; the worker that failed the trial waits for it and adds the retry.
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    monkeypatch.setattr(heartbeat, "REQUEUE_PAUSE_S", 0.05, raising=False)  # absent before the fix
    st = storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3")
    study = optuna.create_study(storage=st, study_name="s")
    study.enqueue_trial({"x": 0.5})
    study.ask()  # ...and its worker dies
    time.sleep(2.2)  # SQLite stamps heartbeats to the second: 2 s apart is always > 1 s grace
    real_fail, real_call = st.set_trial_state_values, getattr(st, cut)
    outages = []

    def fail(trial_id: int, state: TrialState, values: object = None) -> bool:
        taken = real_fail(trial_id, state, values)
        if state == TrialState.FAIL:
            outages.extend([1, 1])  # the database goes down right after the FAIL is written
        return taken

    def flaky(*args: object, **kwargs: object) -> object:
        if outages:
            outages.pop()
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return real_call(*args, **kwargs)

    monkeypatch.setattr(st, "set_trial_state_values", fail)
    monkeypatch.setattr(st, cut, flaky)
    optuna.storages.fail_stale_trials(study)
    assert not outages, "the fault was not injected"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["retry_history"] == [0]  # retried exactly once
    optuna.storages.fail_stale_trials(study)  # and nothing more on the next check
    assert len(study.get_trials()) == 2


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_stale_trial_failed_by_a_worker_killed_before_adding_its_retry_is_retried_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker that failed a stale trial was SIGKILLed before it added the retry: the trial stayed
    # FAIL with no retry for ever. Now any worker re-queues it once it has been so for GRACE_PERIOD, and
    # if two workers both do, the later retry stands down when taken.
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    st = storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3")
    study = optuna.create_study(storage=st, study_name="s")
    study.enqueue_trial({"x": 0.5})
    dead = study.ask()
    dead.suggest_float("x", 0, 1)
    st.set_trial_user_attr(dead._trial_id, "fail_reason", "stale: no heartbeat for 1s; retried")
    st.set_trial_state_values(dead._trial_id, TrialState.FAIL)  # ...and the worker that failed it is killed
    optuna.storages.fail_stale_trials(study)
    assert len(study.get_trials()) == 1  # young: its worker may still be adding the retry
    time.sleep(2.2)  # > GRACE_PERIOD
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["retry_history"] == [0] and trials[1].params == {"x": 0.5}
    optuna.storages.fail_stale_trials(study)
    assert len(study.get_trials()) == 2  # retried once, not at every check
    # Two workers that re-queued it at the same moment: the first retry runs, the second stands down.
    heartbeat.retry_callback()(study, trials[0])
    first, second = study.ask(), study.ask()
    trials = study.get_trials()
    assert heartbeat.earlier_retry(trials, trials[first.number]) is None
    assert heartbeat.earlier_retry(trials, trials[second.number]) == first.number


# ------------------------------------------------------------------ SIGTERM: preemption


def test_sigterm_saves_marks_requeues_exits_fast_and_the_next_run_resumes(tmp_path: Path, folder: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    f = _study_file(tmp_path, epochs=30)  # long enough trials that the signal lands inside both
    proc = subprocess.Popen(_run_cmd(tmp_path, folder, f, 3, 2, url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **FAULT_ENV}, start_new_session=True)  # fmt: skip
    try:
        in_trial: set[str] = set()
        assert proc.stdout is not None
        for line in proc.stdout:
            if "(#" in line and " epoch " in line and not line.split(" epoch ")[1].startswith("1/"):
                in_trial.add(line[:4])
            if len(in_trial) == 2:
                break
        # Like systemd stopping a service: SIGTERM to every process (the parent passes on one more).
        sent = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert took < 10, f"took {took:.1f}s to exit"
    assert "interrupted; finished work is kept" in out
    study = optuna.load_study(study_name=f.stem, storage=url)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all("interrupted" in t.user_attrs["fail_reason"] for t in interrupted)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in interrupted)
    # The snapshots were saved, and the next run resumes from them.
    assert all((trial_folder(tmp_path / "results", study, t.number) / "last.pt").is_file() for t in interrupted)
    done = subprocess.run(_run_cmd(tmp_path, folder, f, 3, 1, url), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **FAULT_ENV})  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    trials = optuna.load_study(study_name=f.stem, storage=url).get_trials()
    assert len(_finished(trials)) == 3 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    resumed = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert len(resumed) == 2
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["resumed_from_epoch"] >= 2 for t in resumed)


@pytest.mark.slow
def test_workers_stop_cleanly_when_the_run_process_is_killed(tmp_path: Path, folder: Path) -> None:
    # kill -9 of the parent: the workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), re-queue and exit.
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    f = _study_file(tmp_path, epochs=30)
    proc = subprocess.Popen(_run_cmd(tmp_path, folder, f, 3, 2, url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **FAULT_ENV}, start_new_session=True)  # fmt: skip
    pids = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if " worker pid " in line:
                pids.append(int(line.split(" worker pid ")[1].split()[0]))
            if " epoch 2/30" in line:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)]
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    trials = optuna.load_study(study_name=f.stem, storage=url).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t for t in trials if t.state == TrialState.WAITING]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ a kill in the middle of writing a checkpoint

WRITER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    from cifar_hpo.storage import checkpoint

    path, rounds = sys.argv[1], int(sys.argv[2])
    rng = random.Random(0)


    def verify(k):
        # In a forked child, so that this process never runs a torch op: forking after torch has
        # started its thread pool can deadlock the child, and the writers are forked from here.
        pid = os.fork()
        if pid == 0:
            import torch

            try:
                obj = checkpoint.load(path)
            except Exception as e:
                print(json.dumps({"round": k, "error": str(e), "exists": os.path.exists(path)}), flush=True)
                os._exit(1)
            ok = bool((obj["w"] == float(obj["step"])).all())
            print(json.dumps({"round": k, "step": obj["step"], "consistent": ok}), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)


    for k in range(rounds):
        pid = os.fork()
        if pid == 0:  # the writer: checkpoints in a loop, as a trial's snapshots are written
            import torch

            step = 1000 * (k + 1)
            while True:
                step += 1
                checkpoint.save({"step": step, "w": torch.full((512, 1024), float(step))}, path)
        time.sleep(rng.uniform(0.15, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tmp = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
        print(json.dumps({"round": k, "tmp_files": len(tmp)}), flush=True)
        verify(k)
    """
)


def test_kill_while_writing_checkpoints_never_leaves_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "trials" / "0" / "last.pt"
    path.parent.mkdir(parents=True)
    rounds = 16
    done = subprocess.run([sys.executable, "-c", WRITER, str(path), str(rounds)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    loads = [e for e in events if "step" in e or "error" in e]
    assert len(loads) == rounds and not [e for e in loads if "error" in e], loads
    assert all(e["consistent"] for e in loads)
    # The writers really wrote in every round (the checkpoint is the last one of that round's writer)...
    assert sum(e["step"] // 1000 == e["round"] + 1 for e in loads) >= rounds - 2
    # ...and kills did land inside writes: their temp files are left behind, and ignored.
    tmp_counts = [e["tmp_files"] for e in events if "tmp_files" in e]
    assert tmp_counts[-1] >= 1 and tmp_counts[-1] == len(list(path.parent.glob(".last.pt.*.tmp")))
    obj = checkpoint.load(path)
    assert bool((obj["w"] == float(obj["step"])).all())
    (path.parent / ".last.pt.zzzz.tmp").write_bytes(b"partial garbage")
    assert checkpoint.load(path)["step"] == obj["step"]


def test_a_truncated_checkpoint_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"w": torch.ones(256, 256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a non-atomic writer would leave
    with pytest.raises(UserError, match="corrupt, truncated"):
        checkpoint.load(path)


# ------------------------------------------------------------------ damaged database files


def _sqlite_study(db: Path, n: int = 12) -> None:
    st = storage.open_storage(f"sqlite:///{db}", heartbeat=False)
    optuna.create_study(storage=st, study_name="s", direction="maximize").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
    st.engine.dispose()
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file, as after a clean exit
    con.close()


def _truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def _smash_page_headers(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for page in range(1, len(data) // 4096, 2):
        data[page * 4096 : page * 4096 + 8] = b"\xff" * 8
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _smash_page_headers], ids=["truncated", "corrupt-pages"])
def test_a_damaged_database_is_one_clear_error_and_left_as_it_was(
    tmp_path: Path, folder: Path, damage: object, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "cifar_hpo.db"
    _sqlite_study(db)
    damage(db)  # type: ignore[operator]
    before = db.read_bytes()
    url = f"sqlite:///{db}"
    study = _study_file(tmp_path, epochs=2)
    for argv in (["status", "--storage", url], ["run", "--study", str(study), "--data", str(folder), "--storage", url, "--trials", "2"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("damaged" in err or "not an SQLite database" in err), err
        assert "Traceback" not in err
    assert db.read_bytes() == before  # nothing written over what may still be recovered
