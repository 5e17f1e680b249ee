"""Files written by main at 83e0274 (before the subpackage layout) are resumed, retrained, reported and exported.

The fixture (tests/fixtures/main-83e0274, made by tests/fixtures/make_old_study.py with that commit's
code) holds a study database with one complete trial, one trial interrupted after epoch 1 with its
retry WAITING, that trial's snapshot, the artifacts (learning curve, best checkpoint) and a final.pt.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.models.final import load_final

FIXTURE = Path(__file__).parent / "fixtures" / "main-83e0274"
sys.path.insert(0, str(FIXTURE.parent))
from make_old_study import fixture_images  # noqa: E402


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A writable copy of the fixture, with its images made again (same bytes and times, so the same split hash)."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    fixture_images(tmp_path / "imgs")
    return root


def _common(old: Path) -> list[str]:
    return ["--study", str(old / "tiny.toml"), "--data", str(old.parent / "imgs"), "--device", "cpu",
            "--storage", f"sqlite:///{old}/db.sqlite3", "--results", str(old / "results"), "--cache-dir", str(old / "cache")]


def _study(old: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{old}/db.sqlite3")


def test_an_old_study_resumes_its_interrupted_trial_from_the_old_snapshot(old: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {t.number: t for t in _study(old).get_trials()}
    assert before[1].state == TrialState.FAIL and before[2].state == TrialState.WAITING
    assert cli.main(["run", *_common(old), "--trials", "2"]) == 0
    assert "resuming trial 1 from epoch 1" in capsys.readouterr().out
    after = {t.number: t for t in _study(old).get_trials()}
    assert after[0].value == before[0].value and after[0].intermediate_values == before[0].intermediate_values  # untouched
    retry = after[2]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 1
    assert sorted(retry.intermediate_values) == [1, 2, 3]
    assert retry.intermediate_values[1] == before[1].intermediate_values[1]  # the epoch trained by the old code is kept
    assert not (old / "results" / "tiny" / "trials" / "1").exists()  # the snapshot is removed once the trial finished
    # The old trial's artifacts are still listed and readable (the dashboard downloads them).
    store = optuna.artifacts.FileSystemArtifactStore(str(old / "artifacts"))
    for meta in optuna.artifacts.get_all_artifact_meta(after[0], storage=_study(old)._storage):
        with store.open_reader(meta.artifact_id) as f:
            assert f.read(4)


def test_an_old_final_model_is_reported_exported_and_predicts(old: Path, tmp_path: Path) -> None:
    final = load_final(old / "results" / "tiny" / "final.pt")
    assert final["format_version"] == 1
    out = tmp_path / "report"
    assert cli.main(["report", "--results", str(old / "results"), "--storage", f"sqlite:///{old}/db.sqlite3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["study"] == "tiny")
    assert row["test_acc_mean"] == pytest.approx(final["test_acc_mean"])
    assert (out / "index.html").is_file()
    exported = tmp_path / "exported"
    assert cli.main(["export", "--study", "tiny", "--results", str(old / "results"), "--out", str(exported),
                     "--data", str(old.parent / "imgs"), "--cache-dir", str(old / "cache")]) == 0  # fmt: skip
    assert (exported / "model.pt2").is_file() and (exported / "model.onnx").is_file()
    assert "same top-1 class as PyTorch" in (exported / "MODEL_CARD.md").read_text()
    image = next((old.parent / "imgs" / "test" / "a").iterdir())
    for model in (old / "results" / "tiny" / "final.pt", exported / "model.pt2"):
        assert cli.main(["predict", "--checkpoint", str(model), str(image)]) == 0


def test_an_old_study_is_retrained_by_replaying_its_best_trial(old: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (old / "results" / "tiny" / "final.pt").unlink()
    assert cli.main(["retrain", *_common(old)]) == 0
    text = capsys.readouterr()
    assert "retraining 'tiny' trial 0" in text.out and "edited" not in text.err
    new = load_final(old / "results" / "tiny" / "final.pt")
    assert new["params"] == _study(old).trials[0].user_attrs["trial_params"]
