"""`run --set KEY=VALUE`: TrialParams fixed for every trial after the search space, recorded, replayed by retrain."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import make_image_folder, study_toml

from cifar_hpo import cli
from cifar_hpo.models.final import load_final


def test_fixed_params_are_trained_recorded_and_replayed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_train=20, n_test=4)
    (tmp_path / "tiny.toml").write_text(study_toml(name="tiny", epochs=1, trials=2))
    common = ["--study", str(tmp_path / "tiny.toml"), "--data", str(folder), "--device", "cpu", "--storage",
              f"sqlite:///{tmp_path}/db.sqlite3", "--results", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli.main(["run", *common, "--set", "dropout=0.25", "--set", "aug_ops=flip"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/db.sqlite3")
    assert study.user_attrs["spec"]["params"] == {"dropout": 0.25, "aug_ops": ["flip"]}
    for t in study.get_trials():
        assert t.user_attrs["trial_params"]["dropout"] == 0.25 and t.user_attrs["trial_params"]["aug_ops"] == ["flip"]
    capsys.readouterr()
    assert cli.main(["retrain", *common]) == 0  # the study file says nothing of --set: the recorded spec does
    assert "replays trial" not in capsys.readouterr().err
    assert load_final(tmp_path / "res" / "tiny" / "final.pt")["params"]["dropout"] == 0.25


def test_a_bad_set_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tiny.toml").write_text(study_toml(name="tiny"))
    for bad, said in (("nope=1", "unknown TrialParams field"), ("dropout=high", "must be float")):
        assert cli.main(["run", "--study", str(tmp_path / "tiny.toml"), "--storage", f"sqlite:///{tmp_path}/db.sqlite3",
                         "--set", bad]) == 2  # fmt: skip
        assert said in capsys.readouterr().err
    assert not (tmp_path / "db.sqlite3").exists()
