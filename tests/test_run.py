"""`cifar-hpo run`: real studies on small data, resume, failures, interrupts, kills, readers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.params import TrialParams
from cifar_hpo.study import objective, pruning


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c", "d"), n_train=30, n_test=5)


def _study_file(tmp_path: Path, *, epochs: int = 3, pruner: str = "median") -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(study_toml(epochs=epochs, trials=4, pruner=pruner))
    return f


def _args(tmp_path: Path, folder: Path, study: Path, trials: int, *extra: str) -> list[str]:
    return [
        "run", "--study", str(study), "--data", str(folder), "--trials", str(trials), "--device", "cpu",
        "--storage", f"sqlite:///{tmp_path}/db.sqlite3", "--results", str(tmp_path / "results"),
        "--cache-dir", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


def _load(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/db.sqlite3")


def _states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def test_study_runs_records_and_resumes_exactly(tmp_path: Path, folder: Path) -> None:
    study_file = _study_file(tmp_path)
    assert cli.main(_args(tmp_path, folder, study_file, 3)) == 0
    study = _load(tmp_path)
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    t = next(t for t in finished if t.state == TrialState.COMPLETE)
    for key in ("images_per_s", "peak_mem_mb", "params_count", "epochs_run", "wall_s", "device", "seed", "versions", "split_hash"):
        assert key in t.user_attrs, key
    assert {tr.user_attrs["split_hash"] for tr in finished} == {study.user_attrs["split_hash"]}
    assert TrialParams.from_dict(t.user_attrs["trial_params"]).model == "baseline_cnn"
    assert sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs_run"] + 1))
    # Learning curve (and the best checkpoint) are in the artifact store beside the database.
    metas = optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
    assert any(m.mimetype == "image/png" for m in metas)
    assert (tmp_path / "artifacts").is_dir() and any((tmp_path / "artifacts").iterdir())
    assert (tmp_path / "results" / "tiny" / "spec.json").is_file()
    # Running the same command again with a larger count finishes exactly the remainder.
    assert cli.main(_args(tmp_path, folder, study_file, 5)) == 0
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in _states(_load(tmp_path))) == 5
    assert cli.main(_args(tmp_path, folder, study_file, 5)) == 0
    assert len(_load(tmp_path).get_trials()) == 5


def test_pruner_prunes(tmp_path: Path, folder: Path) -> None:
    study_file = _study_file(tmp_path, epochs=4, pruner="successive_halving")
    assert cli.main(_args(tmp_path, folder, study_file, 8)) == 0
    states = _states(_load(tmp_path))
    assert states.count(TrialState.PRUNED) >= 1 and states.count(TrialState.COMPLETE) >= 1
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 8


def test_exception_and_nonfinite_fail_one_trial_each(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pruning.suggest_params

    def flaky(spec, trial):  # type: ignore[no-untyped-def]
        params = real(spec, trial)
        if trial.number == 1:
            raise ValueError("bug in a user's search space")
        if trial.number == 2:
            return params.replace(lr=1e30, optimizer="sgd", schedule="constant")
        return params

    monkeypatch.setattr(pruning, "suggest_params", flaky)
    assert cli.main(_args(tmp_path, folder, _study_file(tmp_path), 3)) == 0
    trials = _load(tmp_path).get_trials()
    assert trials[1].state == TrialState.FAIL and "bug in a user's search space" in trials[1].user_attrs["fail_reason"]
    assert trials[2].state == TrialState.FAIL and "non-finite" in trials[2].user_attrs["fail_reason"]
    assert trials[2].value is None
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3


def test_failures_in_a_row_stop_with_the_reason(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    def broken(spec, trial):  # type: ignore[no-untyped-def]
        raise RuntimeError("always broken")

    monkeypatch.setattr(pruning, "suggest_params", broken)
    assert cli.main(_args(tmp_path, folder, _study_file(tmp_path), 3)) == 2
    assert "5 trials in a row failed" in capsys.readouterr().err
    assert _states(_load(tmp_path)).count(TrialState.FAIL) == 5


def test_ctrl_c_marks_trial_failed_and_resume_continues_it(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR_HPO_SNAPSHOT_S", "0")  # snapshot after every epoch
    study_file = _study_file(tmp_path, epochs=3, pruner="none")
    original = objective._progress

    def interrupt(ctx, trial, n_done, r, started):  # type: ignore[no-untyped-def]
        original(ctx, trial, n_done, r, started)
        if trial.number == 1 and r.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(objective, "_progress", interrupt)
    assert cli.main(_args(tmp_path, folder, study_file, 3)) == 130
    trials = _load(tmp_path).get_trials()
    assert trials[1].state == TrialState.FAIL and "interrupted" in trials[1].user_attrs["fail_reason"]
    assert trials[2].state == TrialState.WAITING  # re-queued with the same parameters
    assert trials[2].params == trials[1].params
    assert not any(t.state == TrialState.RUNNING for t in trials)
    monkeypatch.setattr(objective, "_progress", original)
    assert cli.main(_args(tmp_path, folder, study_file, 3)) == 0
    trials = _load(tmp_path).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert trials[2].state == TrialState.COMPLETE and trials[2].user_attrs["resumed_from_epoch"] == 2


def test_trials_zero_and_split_mismatch_are_refused(tmp_path: Path, folder: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    study_file = _study_file(tmp_path)
    assert cli.main(_args(tmp_path, folder, study_file, 0)) == 2
    assert "--trials must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "db.sqlite3").exists()
    assert cli.main(_args(tmp_path, folder, study_file, 1)) == 0
    before = len(_load(tmp_path).get_trials())
    assert cli.main(_args(tmp_path, folder, study_file, 2, "--subset", "60")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar-hpo: error")]
    assert len(errors) == 1 and "another split" in errors[0]
    assert len(_load(tmp_path).get_trials()) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_run(tmp_path: Path, folder: Path, study: Path, trials: int, env_extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {**os.environ, **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_hpo.cli", *_args(tmp_path, folder, study, trials)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def _wait_for_line(proc: subprocess.Popen[str], fragment: str, timeout: float = 120) -> list[str]:
    seen = []
    deadline = time.time() + timeout
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if fragment in line:
            return seen
    raise AssertionError(f"{fragment!r} not seen; output:\n{''.join(seen)}")


@pytest.mark.slow
def test_readers_during_a_run_cli_load_study_and_dashboard(tmp_path: Path, folder: Path) -> None:
    study_file = _study_file(tmp_path, epochs=4, pruner="none")
    proc = _spawn_run(tmp_path, folder, study_file, 6, {})
    dash = None
    try:
        _wait_for_line(proc, "trial #1 ")
        url = f"sqlite:///{tmp_path}/db.sqlite3"
        # optuna.load_study from another process while the study runs.
        code = f"import optuna; s = optuna.load_study(study_name='tiny', storage='{url}'); print(len(s.trials))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and int(out.stdout.strip()) >= 1
        # The optuna CLI, too.
        optuna_cli = Path(sys.executable).parent / "optuna"
        out = subprocess.run([str(optuna_cli), "trials", "--study-name", "tiny", "--storage", url, "-f", "json"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)) >= 1
        # The real dashboard server on 127.0.0.1, via our command.
        port = _free_port()
        dash = subprocess.Popen(
            [sys.executable, "-m", "cifar_hpo.cli", "dashboard", "--storage", url, "--results", str(tmp_path / "results"),
             "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        studies = None
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert studies and studies[0]["study_name"] == "tiny"
        sid = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}", timeout=10) as r:
            detail = json.load(r)
        done = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert done and done[0]["artifacts"], detail["trials"][0]
        art = done[0]["artifacts"][0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/artifacts/{sid}/{done[0]['trial_id']}/{art['artifact_id']}",
                                    timeout=10) as r:  # fmt: skip
            assert r.status == 200 and len(r.read()) > 100
        assert proc.wait(timeout=300) == 0
    finally:
        for p in (proc, dash):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_sigkill_mid_trial_is_failed_and_retried_from_its_snapshot(tmp_path: Path, folder: Path) -> None:
    study_file = _study_file(tmp_path, epochs=4, pruner="none")
    env = {"CIFAR_HPO_HEARTBEAT": "1", "CIFAR_HPO_GRACE": "3", "CIFAR_HPO_SNAPSHOT_S": "0"}
    proc = _spawn_run(tmp_path, folder, study_file, 3, env)
    _wait_for_line(proc, "(#1) epoch 2/4")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _load(tmp_path).get_trials()[1]
    assert killed.state == TrialState.RUNNING  # a zombie, until the study next runs
    time.sleep(4)  # past the grace period
    proc = _spawn_run(tmp_path, folder, study_file, 3, env)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    trials = _load(tmp_path).get_trials()
    assert trials[1].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[1].params and retries[0].user_attrs["resumed_from_epoch"] >= 1
    assert not any(t.state == TrialState.RUNNING for t in trials)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3


def test_surplus_guard_counts_lower_numbered_trials(tmp_path: Path) -> None:
    from cifar_hpo.study.worker import _count_blocking

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    running = study.ask()
    assert _count_blocking(study, running.number + 1) == 3
    assert _count_blocking(study, running.number) == 2



def test_every_listed_artifact_can_be_downloaded(tmp_path: Path) -> None:
    # Each finished trial beats the last, so each pushes the oldest checkpoint out of the best three;
    # an artifact the study lists (and optuna-dashboard offers) must still open.
    from types import SimpleNamespace

    import torch

    from cifar_hpo import storage
    from tests.test_train import SMALL

    store = storage.artifact_store(f"sqlite:///{tmp_path}/db.sqlite3", tmp_path)
    study = optuna.create_study(direction="maximize")
    ctx = SimpleNamespace(store=store, data=SimpleNamespace(classes=("a", "b"), mean=(0.5,) * 3, std=(0.25,) * 3))
    for value in (0.1, 0.2, 0.3, 0.4, 0.5):
        trial = study.ask()
        objective._keep_checkpoint(trial, ctx, SMALL, {"state": {"w": torch.zeros(2)}, "epoch": 1, "acc": value}, value)  # type: ignore[arg-type]
        study.tell(trial, value)
    listed = [m.artifact_id for t in study.get_trials() for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)]
    assert len(listed) == 5
    for artifact_id in listed:
        with store.open_reader(artifact_id) as f:
            assert f.read(2)
