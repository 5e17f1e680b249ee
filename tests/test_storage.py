"""Storage URLs, SQLite safety settings, masking, and bad storage input."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import optuna
import pytest

from cifar_hpo import cli, storage
from cifar_hpo.errors import UserError


def test_default_url_env_and_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(storage.ENV_VAR, raising=False)
    assert storage.storage_url(None, tmp_path) == f"sqlite:///{tmp_path}/cifar_hpo.db"
    monkeypatch.setenv(storage.ENV_VAR, "postgresql://u:pw@h/db")
    assert storage.storage_url(None, tmp_path) == "postgresql://u:pw@h/db"
    assert storage.storage_url("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_mask_url_hides_password() -> None:
    assert storage.mask_url("postgresql://alice:s3cret@db:5432/hpo") == "postgresql://alice:***@db:5432/hpo"
    assert "s3cret" not in storage.mask_url("mysql+pymysql://bob:s3cret@h/d")
    assert storage.mask_url("sqlite:///results/cifar_hpo.db") == "sqlite:///results/cifar_hpo.db"


def test_sqlite_is_wal_owner_only_and_usable(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "s.db"
    st = storage.open_storage(f"sqlite:///{db}")
    study = optuna.create_study(storage=st, study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert st.heartbeat_interval if hasattr(st, "heartbeat_interval") else st.get_heartbeat_interval()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("not a url", "is malformed"),
        ("postgresql+psycopg://nobody:pw@127.0.0.1:1/none", "cannot be opened"),
    ],
)
def test_bad_storage_is_one_line(url: str, fragment: str) -> None:
    with pytest.raises(UserError) as e:
        storage.open_storage(url)
    assert fragment in str(e.value) and "pw" not in str(e.value).replace("pip", "")


def test_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "cifar_hpo.db"
    db.write_bytes(b"this is not sqlite at all, just text" * 10)
    before = db.read_bytes()
    with pytest.raises(UserError, match="not an SQLite database"):
        storage.open_storage(f"sqlite:///{db}")
    assert db.read_bytes() == before


def test_truncated_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    st = storage.open_storage(f"sqlite:///{db}")
    optuna.create_study(storage=st, study_name="s").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    del st
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError):
        st = storage.open_storage(f"sqlite:///{db}")
        optuna.load_study(study_name="s", storage=st).get_trials()


def test_status_with_masked_password_on_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["status", "--storage", "postgresql://carol:hunter2@127.0.0.1:1/x"])
    err = capsys.readouterr().err
    assert code == 2 and "hunter2" not in err and "carol:***@" in err and err.count("\n") == 1


def test_status_never_creates_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--results", str(tmp_path / "r")]) == 0
    assert "no study database" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_dashboard_on_a_missing_database_is_one_line_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dashboard", "--results", str(tmp_path / "r")]) == 2
    assert "no study database at" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
