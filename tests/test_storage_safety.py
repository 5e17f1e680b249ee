"""Nothing outside a running study can break it: readers coming and going, concurrent starts, lost writes.

    python -m pytest tests/test_storage_safety.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from conftest import make_image_folder, study_toml, wait_for_dashboard
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.data import study_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c"), n_train=24, n_test=4)


def _study_file(tmp_path: Path, *, epochs: int, trials: int) -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(study_toml(epochs=epochs, trials=trials, pruner="none"))
    return f


def _run_cmd(tmp_path: Path, folder: Path, study: Path, trials: int) -> list[str]:
    return [
        sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(study), "--data", str(folder), "--trials", str(trials),
        "--device", "cpu", "--storage", f"sqlite:///{tmp_path}/db.sqlite3", "--results", str(tmp_path / "results"),
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip


def _deleted_wal(pid: int) -> list[str]:
    """The -wal/-shm files process ``pid`` still writes to although they were deleted under it."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if ("-wal" in target or "-shm" in target) and "(deleted)" in target:
                found.append(target)
    except OSError:
        pass
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the run's open files")
def test_readers_coming_and_going_never_break_a_running_study(tmp_path: Path, folder: Path) -> None:
    """Issue 9: a reader that connects and disconnects deleted the running study's WAL; its COMPLETEs were lost."""
    study_file = _study_file(tmp_path, epochs=3, trials=3)
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    env = {**os.environ, "CIFAR_HPO_HEARTBEAT": "2"}
    proc = subprocess.Popen(_run_cmd(tmp_path, folder, study_file, 3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)  # fmt: skip
    lines: list[str] = []
    training = threading.Event()

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "(#0) epoch 1/" in line:
                training.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    deleted: list[str] = []
    readers_run = 0
    try:
        assert training.wait(timeout=180), "".join(lines)
        optuna_cli = Path(sys.executable).parent / "optuna"
        probes = [
            [sys.executable, "-m", "cifar_hpo.cli", "status", "--storage", url],
            [sys.executable, "-m", "cifar_hpo.cli", "status", "--storage", url, "--study", "tiny"],
            [sys.executable, "-c", f"import optuna; print(len(optuna.load_study(study_name='tiny', storage='{url}').trials))"],
            [str(optuna_cli), "trials", "--study-name", "tiny", "--storage", url, "-f", "json"],
        ]
        # Once: the dashboard's HTTP API (its server does not stop on Ctrl-C; SIGTERM ends it).
        port = _free_port()
        dash = subprocess.Popen([sys.executable, "-m", "cifar_hpo.cli", "dashboard", "--storage", url, "--results",
                                 str(tmp_path / "results"), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for_dashboard(dash, port, tries=60)
        finally:
            dash.terminate()
            dash.wait(timeout=30)
        readers_run += 1
        while proc.poll() is None:
            for cmd in probes:
                deleted += _deleted_wal(proc.pid)
                subprocess.run(cmd, capture_output=True, timeout=120)
                readers_run += 1
                deleted += _deleted_wal(proc.pid)
                if proc.poll() is not None:
                    break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert readers_run >= 3, out
    assert not deleted, f"the run's WAL was deleted under it: {sorted(set(deleted))}\n{out}"
    assert "disk I/O error" not in out and proc.returncode == 0, out
    logged = {int(n): float(v) for n, v in re.findall(r"trial #(\d+) complete, val_acc ([0-9.]+)", out)}
    assert len(logged) == 3, out
    trials = {t.number: t for t in optuna.load_study(study_name="tiny", storage=url).get_trials()}
    for number, value in logged.items():
        assert trials[number].state == TrialState.COMPLETE and round(trials[number].value, 4) == value, out  # type: ignore[arg-type]


class _FlakyWrites:
    """Makes the storage's trial-state writes of finished trials fail ``n`` times, as a lost database does."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.calls = 0

    def wrap(self, st: optuna.storages.RDBStorage) -> None:
        original = st.set_trial_state_values

        def flaky(trial_id: int, state: TrialState, values: object = None) -> bool:
            if state.is_finished() and self.left > 0:
                self.left -= 1
                self.calls += 1
                raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("server closed the connection unexpectedly"))
            return original(trial_id, state, values)  # type: ignore[arg-type]

        st.set_trial_state_values = flaky  # type: ignore[method-assign]


def test_a_finished_trial_keeps_its_value_while_the_database_is_away(tmp_path: Path, folder: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Issue 9, item 4: the final write of a trained trial failing must not throw the result away (nor retrain it)."""
    from cifar_hpo.study import objective
    from cifar_hpo.study import worker as run

    monkeypatch.setattr(run, "RETRY_WRITE_S", 0.01, raising=False)
    flaky = _FlakyWrites(3)
    real_open = storage.open_storage

    def open_flaky(url: str, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
        st = real_open(url, heartbeat=heartbeat)
        if heartbeat:
            flaky.wrap(st)
        return st

    monkeypatch.setattr(storage, "open_storage", open_flaky)
    trained: list[int] = []
    real_objective = run.objective

    def counting(trial: optuna.Trial, ctx: objective.Context) -> float:
        trained.append(trial.number)
        return real_objective(trial, ctx)

    monkeypatch.setattr(run, "objective", counting)
    from cifar_hpo import cli

    study_file = _study_file(tmp_path, epochs=1, trials=1)
    assert cli.main(_run_cmd(tmp_path, folder, study_file, 1)[3:]) == 0
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/db.sqlite3").get_trials()
    assert flaky.calls == 3
    assert [t.state for t in trials] == [TrialState.COMPLETE] and trials[0].value is not None
    assert trained == [0]  # trained once, its value written when the database was back


def test_two_runs_started_together_on_a_fresh_database(tmp_path: Path, folder: Path) -> None:
    """Issue 9, item 5: the second died on "table ... already exists", and both drew the same parameters."""
    study_file = _study_file(tmp_path, epochs=1, trials=4)
    cmd = _run_cmd(tmp_path, folder, study_file, 4)
    # The data cache is decoded first, so that both runs reach the database at the same moment.
    subprocess.run([sys.executable, "-m", "cifar_hpo.cli", "explore", "--data", str(folder), "--cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "explore")], capture_output=True, timeout=300, check=True)  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/db.sqlite3").get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4, "\n---\n".join(outs)
    params = [tuple(sorted(t.params.items())) for t in trials if t.params]
    assert len(params) == len(set(params)), params
    seeds = {t.user_attrs.get("sampler_seed") for t in finished}
    assert len(seeds) == 2 and None not in seeds  # one per process, recorded with every trial


def test_concurrent_schema_creation_is_serialized(tmp_path: Path) -> None:
    """Many processes opening one fresh SQLite file at once all succeed (the schema is created once)."""
    url = f"sqlite:///{tmp_path}/fresh.db"
    code = f"from cifar_hpo import storage; storage.open_storage({url!r}); print('ok')"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(4)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 and out.strip().endswith("ok") for p, out in zip(procs, outs, strict=True)), outs


def test_a_new_study_never_resumes_an_old_studys_snapshot(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9, item 5: ``trials/0/last.pt`` left by an earlier database (another split) was resumed by a new trial 0."""

    import torch

    from cifar_hpo import cli, models
    from cifar_hpo import training as train
    from cifar_hpo.storage import checkpoint
    from cifar_hpo.study import pruning
    from cifar_hpo.study.spec import load_spec

    params = models.default_params("baseline_cnn").replace(batch_size=16)
    monkeypatch.setattr(pruning, "suggest_params", lambda spec, trial: params)  # same params in both studies
    study_file = _study_file(tmp_path, epochs=2, trials=1)
    # The earlier study: another split (a subset), trained one epoch of trial 0, snapshot left behind.
    old_spec = load_spec(str(study_file)).with_overrides(data=str(folder), subset=30)
    d = old_spec.data
    data = study_data(d.source, subset=d.subset, val_fraction=d.val_fraction, split_seed=d.split_seed, device="cpu",
                      cache_dir=tmp_path / "cache")
    snaps: list[dict] = []
    torch.manual_seed(0)
    train.train(models.build(params, data.num_classes), data, params, epochs=2,
                on_epoch=lambda r, snapshot: snaps.append(snapshot()) if r.epoch == 1 else None)  # fmt: skip
    last = tmp_path / "results" / "tiny" / "trials" / "0" / "last.pt"
    checkpoint.save(snaps[0], last)

    assert cli.main(_run_cmd(tmp_path, folder, study_file, 1)[3:]) == 0
    t0 = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/db.sqlite3").get_trials()[0]
    assert t0.state == TrialState.COMPLETE
    assert "resumed_from_epoch" not in t0.user_attrs  # trained from scratch on this study's split
    assert not last.exists()  # and the foreign snapshot was cleaned away
