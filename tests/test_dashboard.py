"""The dashboard names things: metric `val_acc`, a study note in words, each trial's learning curve.

Checked through Optuna, through the real optuna-dashboard server's API, and in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import optuna
import optuna_dashboard
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.study import note as dashboard_notes
from cifar_hpo.study.spec import load_spec


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 3-trial study 'tiny' (2 epochs per trial) on a synthetic 3-class folder."""
    root = tmp_path_factory.mktemp("dash")
    folder = make_image_folder(root / "imgs", n_train=20, n_test=6)
    (root / "tiny.toml").write_text(study_toml(name="tiny", epochs=2, trials=3))
    db, results = f"sqlite:///{root}/db.sqlite3", root / "results"
    argv = ["run", "--study", str(root / "tiny.toml"), "--data", str(folder), "--storage", db, "--results", str(results),
            "--cache-dir", str(root / "cache"), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    return SimpleNamespace(root=root, folder=folder, db=db, results=results, argv=argv)


def test_metric_name_and_study_note(env: SimpleNamespace) -> None:
    study = optuna.load_study(study_name="tiny", storage=env.db)
    assert study.metric_names == ["val_acc"]
    note = optuna_dashboard.get_note(study)
    spec = load_spec(str(env.root / "tiny.toml")).with_overrides(data=str(env.folder))
    for text in ("## tiny: baseline_cnn", "**Metric `val_acc`**", "search space `baseline`", "2 epochs\nper trial",
                 f"`{env.folder}`", "10 % of the training images", "split seed 42", study.user_attrs["split_hash"],
                 "54 training / 6 validation images", "pruner none", "| `lr` | real number from 0.0001 to 0.01 (log scale) |",
                 "| `optimizer` | one of `adam`, `adamw`, `sgd` |", "(only for some choices above)", "trial-N-curve.png"):  # fmt: skip
        assert text in note, text
    assert note == dashboard_notes.study_note(spec, study.user_attrs["split_hash"], (54, 6))


def test_a_note_edited_by_the_user_is_kept(env: SimpleNamespace, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/copy.sqlite3"
    with sqlite3.connect(env.root / "db.sqlite3") as src, sqlite3.connect(tmp_path / "copy.sqlite3") as dst:
        src.backup(dst)  # the WAL's pages too
    study = optuna.load_study(study_name="tiny", storage=db)
    optuna_dashboard.save_note(study, "my own words")
    argv = [a if a != env.db else db for a in env.argv]
    argv[argv.index("--results") + 1] = str(tmp_path / "results")
    assert cli.main([*argv, "--trials", "4"]) == 0
    assert optuna_dashboard.get_note(optuna.load_study(study_name="tiny", storage=db)) == "my own words"


def test_search_space_words_cover_conditional_branches() -> None:
    spec = load_spec("baseline")
    words = {n: (w, cond) for n, w, cond in dashboard_notes.search_space_words(spec)}
    assert words["momentum"] == ("real number from 0.8 to 0.95 (uniform)", True)  # only when optimizer == sgd
    assert words["optimizer"][1] is False and words["batch_size"][0].startswith("one of `64`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return bytes(r.read())


@pytest.mark.slow
def test_the_real_dashboard_shows_names_note_and_curves(env: SimpleNamespace, tmp_path: Path) -> None:
    from browser import chromium_or_skip, dump_dom, screenshot

    port = _free_port()
    dash = subprocess.Popen([sys.executable, "-m", "cifar_hpo.cli", "dashboard", "--storage", env.db, "--results", str(env.results),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        studies = None
        for _ in range(120):
            try:
                studies = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert studies and studies[0]["study_name"] == "tiny"
        sid = studies[0]["study_id"]
        detail = json.loads(_get(f"{base}/api/studies/{sid}"))
        assert detail["objective_names"] == ["val_acc"]
        assert detail["note"]["body"].startswith("## tiny: baseline_cnn")
        finished = [t for t in detail["trials"] if t["state"] in ("Complete", "Pruned")]
        assert len(finished) == 3
        for t in finished:  # every finished trial: its curve as an image artifact, served by the dashboard
            curves = [a for a in t["artifacts"] if a["filename"] == f"trial-{t['number']}-curve.png"]
            assert len(curves) == 1 and curves[0]["mimetype"] == "image/png", t["artifacts"]
            png = _get(f"{base}/artifacts/{sid}/{t['trial_id']}/{curves[0]['artifact_id']}")
            assert png.startswith(b"\x89PNG")
            assert len(t["intermediate_values"]) == 2

        # In a browser: the JS app renders the metric name and the note on the study page, the curve on the trial page.
        chromium_or_skip()
        dom = dump_dom(f"{base}/dashboard/studies/{sid}", budget_ms=15000)
        assert "val_acc" in dom and "Objective 0" not in dom  # the history plot's axis and selector
        dom = dump_dom(f"{base}/dashboard/studies/{sid}/note", budget_ms=15000)
        assert "tiny: baseline_cnn" in dom and "Search space" in dom and "Data split" in dom and "real number from 0.0001" in dom
        trial = finished[0]
        dom = dump_dom(f"{base}/dashboard/studies/{sid}/trials?numbers={trial['number']}", budget_ms=15000)
        assert f"trial-{trial['number']}-curve.png" in dom
        keep = os.environ.get("CIFAR_HPO_KEEP_SCREENSHOTS")  # to look at them: CIFAR_HPO_KEEP_SCREENSHOTS=folder
        for name, url in (("dashboard_study", f"{base}/dashboard/studies/{sid}"),
                          ("dashboard_note", f"{base}/dashboard/studies/{sid}/note"),
                          ("dashboard_trial", f"{base}/dashboard/studies/{sid}/trials?numbers={trial['number']}")):  # fmt: skip
            png = screenshot(url, tmp_path / f"{name}.png", size=(1400, 1800), budget_ms=15000)
            if keep:
                shutil.copy(png, Path(keep) / png.name)
    finally:
        dash.kill()
        dash.wait()
    assert optuna.load_study(study_name="tiny", storage=env.db).get_trials(states=(TrialState.RUNNING,)) == []
