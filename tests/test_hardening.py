"""Issue 9, item 5: one line instead of a traceback, nothing left behind, nothing written outside --results.

    python -m pytest tests/test_hardening.py -q
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import make_image_folder, retrained_demo, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli, storage
from cifar_hpo.errors import UserError
from cifar_hpo.models import final as finalmodel
from cifar_hpo.storage import checkpoint, heartbeat
from cifar_hpo.study.spec import parse_spec

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------- study names


@pytest.mark.parametrize("name", ["../../../escaped", "a/b", "/abs", ".hidden", "", "x" * 65, "sp ace"])
def test_unsafe_study_names_are_refused(name: str, tmp_path: Path) -> None:
    raw = {"name": name, "model": "baseline_cnn", "search_space": "baseline", "epochs": 1, "trials": 1}
    with pytest.raises(UserError, match="study name"):
        parse_spec(raw, tmp_path / "s.toml")


def test_a_study_named_out_of_results_writes_nothing_outside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    f = work / "evil.toml"
    f.write_text(study_toml(name="../../../escaped", epochs=1, trials=1))
    code = cli.main(["run", "--study", str(f), "--results", str(work / "results"), "--storage", f"sqlite:///{work}/db.sqlite3",
                     "--data", str(tmp_path / "nothing")])  # fmt: skip
    _one_line_error(capsys, code, "study name")
    assert not (tmp_path / "escaped").exists() and not (work / "results").exists()
    assert parse_spec({"name": "ok-name_1.v2", "model": "baseline_cnn", "search_space": "baseline", "epochs": 1, "trials": 1},
                      tmp_path / "s.toml").name == "ok-name_1.v2"  # fmt: skip


# ---------------------------------------------------------------- storage URLs


@pytest.mark.parametrize(
    "url, secret, tail",
    [
        ("alice:pw1234@host/db", "pw1234", "host/db"),  # no scheme
        ("postgresql://alice:p@ss9word@host/db", "ss9word", "host/db"),  # unescaped @ in the password
        ("postgresql://alice:p@ss9word@host:5432/db?sslmode=require", "ss9word", "host:5432/db?sslmode=require"),
    ],
)
def test_mask_url_never_shows_any_part_of_the_password(url: str, secret: str, tail: str) -> None:
    shown = storage.mask_url(url)
    assert secret not in shown, shown
    # Everything but the password is kept: scheme, user, host, port, database and query.
    assert shown == url.partition("alice:")[0] + "alice:***@" + tail, shown


def test_a_bad_port_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["status", "--storage", "postgresql://carol:hunter2@127.0.0.1:notaport/x"])
    _one_line_error(capsys, code, "is malformed")


def test_a_failed_run_leaves_no_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "tiny.toml"
    f.write_text(study_toml(epochs=1, trials=1))
    db = tmp_path / "res" / "cifar_hpo.db"
    code = cli.main(["run", "--study", str(f), "--results", str(tmp_path / "res"), "--data", str(tmp_path / "no-such-data"),
                     "--storage", f"sqlite:///{db}", "--device", "cpu"])  # fmt: skip
    assert code == 2
    capsys.readouterr()
    assert not db.exists() and not Path(f"{db}-wal").exists()


# ---------------------------------------------------------------- train command


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--set", "nosuchkey=1"], "unknown TrialParams field"),
        (["--set", "lr=abc"], "must be float"),
        (["--set", "batch_size=1.5"], "must be int"),
        (["--set", "arch=3"], "arch"),
        (["--epochs", "-2"], "--epochs must be >= 1"),
    ],
)
def test_train_rejects_bad_input_in_one_line(argv: list[str], fragment: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder = make_image_folder(tmp_path / "imgs", n_train=8, n_test=2)
    code = cli.main(["train", "--model", "baseline_cnn", "--data", str(folder), "--cache-dir", str(tmp_path / "cache"),
                     "--device", "cpu", "--epochs", "1", *argv])  # fmt: skip
    _one_line_error(capsys, code, fragment)


# ---------------------------------------------------------------- final checkpoints and exports


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return retrained_demo(tmp_path_factory.mktemp("final"), n_train=12, n_test=3)


def test_exported_models_are_owner_only(made: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert cli.main(["export", "--study", "demo", "--results", str(made.results), "--out", str(out)]) == 0
    models = sorted(out.glob("model.*"))
    assert models
    for p in [*models, out / "final.pt"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"num_classes": "3"}, "num_classes"),
        ({"classes": ["a", "b"]}, "names 2 classes for a model with 3 outputs"),
        ({"mean": "0.5"}, "mean and std"),
        ({"input_size": [3, "32", 32]}, "input_size"),
        ({"params": [1, 2]}, "params"),
    ],
)
def test_a_final_checkpoint_with_bad_fields_is_refused(made: SimpleNamespace, change: dict, fragment: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    obj = finalmodel.load_final(made.final)
    bad = tmp_path / "bad.pt"
    checkpoint.save({**obj, **change}, bad)
    code = cli.main(["predict", "--checkpoint", str(bad), str(made.image)])
    _one_line_error(capsys, code, fragment)


# ---------------------------------------------------------------- leftovers, stale trials, signals, pipes


def test_temp_files_of_killed_writers_are_cleaned_by_the_next_run(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", n_train=8, n_test=2)
    f = tmp_path / "tiny.toml"
    f.write_text(study_toml(epochs=1, trials=1))
    trial_dir = tmp_path / "res" / "tiny" / "trials" / "0"
    trial_dir.mkdir(parents=True)
    # What a SIGKILLed writer leaves: our naming, a pid that is gone; and an old one of another host.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = trial_dir / f".last.pt.{checkpoint._HOST}-{dead.pid}-k1x2.tmp"
    left.write_bytes(b"partial")
    foreign = tmp_path / "res" / "artifacts" / ".abc.otherhost-1-zz.tmp"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"partial")
    old = time.time() - 2 * checkpoint.STALE_TMP_S
    os.utime(foreign, (old, old))
    alive = trial_dir.parent.parent / f".x.pt.{checkpoint._HOST}-{os.getpid()}-k1x2.tmp"  # being written by a live process
    alive.write_bytes(b"partial")
    code = cli.main(["run", "--study", str(f), "--results", str(tmp_path / "res"), "--data", str(folder), "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache"), "--trials", "1"])  # fmt: skip
    assert code == 0
    assert not left.exists() and not foreign.exists() and alive.exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_stale_trial_is_failed_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(heartbeat, "GRACE_PERIOD", 1)
    study = optuna.create_study(storage=storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3"), study_name="s")
    study.ask()  # ...and its worker dies
    time.sleep(2.2)  # SQLite stamps heartbeats to the second
    optuna.storages.fail_stale_trials(study)
    t0 = study.get_trials()[0]
    assert t0.state == TrialState.FAIL and str(t0.user_attrs.get("fail_reason", "")).startswith("stale: no heartbeat")


def test_sigterm_prints_no_optuna_traceback(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "imgs", n_train=16, n_test=2)
    f = tmp_path / "tiny.toml"
    f.write_text(study_toml(epochs=50, trials=1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(f), "--results", str(tmp_path / "res"), "--data", str(folder),
         "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--trials", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "CIFAR_HPO_SNAPSHOT_S": "0"},
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "(#0) epoch 1/" in line:
            break
    os.kill(proc.pid, signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest and "interrupted" in rest and len(rest.strip().splitlines()) <= 3, rest


def test_a_closed_pipe_is_not_a_traceback() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cifar_hpo.cli", "studies"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `| head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) != 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# ---------------------------------------------------------------- the database file itself


def test_opening_storage_never_opens_the_database_file_outside_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing any descriptor of the file drops the process's SQLite locks (the root of issue 9)."""
    import builtins

    db = tmp_path / "s.db"
    first = storage.open_storage(f"sqlite:///{db}")  # holds connections from here on
    optuna.create_study(storage=first, study_name="s")
    real_open, real_os_open = builtins.open, os.open
    touched: list[str] = []

    # Only descriptors actually opened count (an O_EXCL create that fails on the existing file opens none).
    def guarded_open(file: object, *args: object, **kwargs: object) -> object:
        f = real_open(file, *args, **kwargs)  # type: ignore[call-overload]
        if str(file).startswith(str(db)):
            touched.append(str(file))
        return f

    def guarded_os_open(path: object, *args: object, **kwargs: object) -> int:
        fd = real_os_open(path, *args, **kwargs)  # type: ignore[arg-type]
        if str(path).startswith(str(db)):
            touched.append(str(path))
        return fd

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    storage.open_storage(f"sqlite:///{db}")  # a second open in the same process, as run used to do
    assert touched == []


@pytest.mark.parametrize("reason", ["disk I/O error", "attempt to write a readonly database", "unable to open database file"])
def test_io_errors_are_not_called_damage(reason: str) -> None:
    import sqlite3

    text = storage.sqlite_error_text("results/cifar_hpo.db", sqlite3.OperationalError(reason))
    assert reason in text and "damaged" not in text and "restore a backup" not in text
