"""`cifar-hpo report`: figures exist, numbers equal the study's and the checkpoints', bad input."""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.models.final import load_final
from cifar_hpo.report import data as report_data
from cifar_hpo.report import page as report_page
from cifar_hpo.storage import checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 2-trial study 'tiny' (plus one pruned trial), its final model and the baseline's, 2 seeds each."""
    root = tmp_path_factory.mktemp("report")
    folder = make_image_folder(root / "imgs", n_train=20, n_test=6)
    db, results, cache = f"sqlite:///{root}/db.sqlite3", root / "res", root / "cache"
    for name in ("tiny", "baseline"):
        (root / f"{name}.toml").write_text(study_toml(name=name, epochs=1, trials=2))
    common = ["--storage", db, "--results", str(results), "--cache-dir", str(cache), "--device", "cpu"]
    assert cli.main(["run", "--study", str(root / "tiny.toml"), "--data", str(folder), "--trials", "2", *common]) == 0
    study = optuna.load_study(study_name="tiny", storage=db)
    done = study.get_trials()[0]
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=done.params, distributions=done.distributions,
                                              intermediate_values={1: 0.1}))  # fmt: skip
    assert cli.main(["retrain", "--study", str(root / "tiny.toml"), "--seeds", "2", *common]) == 0
    assert cli.main(["retrain", "--study", str(root / "baseline.toml"), "--default-params", "--data", str(folder),
                     "--seeds", "2", *common]) == 0  # fmt: skip
    return SimpleNamespace(root=root, folder=folder, db=db, results=results)


def test_report_files_and_numbers(env: SimpleNamespace, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "report"
    assert cli.main(["report", "--results", str(env.results), "--storage", env.db, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = ["accuracy.png", "learning_curves.png", "per_class.png", "confusion_baseline.png", "confusion_tiny.png",
                "study_tiny_history.png", "study_tiny_intermediate.png"]  # fmt: skip
    for name in expected:
        assert name in summary["figures"], name
    for name in summary["figures"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150
    assert not (out / "study_baseline_history.png").exists()  # no baseline study in the storage
    assert any("study 'baseline' is not in" in n for n in summary["notes"])

    tiny = load_final(env.results / "tiny" / "final.pt")
    base = load_final(env.results / "baseline" / "final.pt")
    study = optuna.load_study(study_name="tiny", storage=env.db)
    rows = {r["study"]: r for r in summary["rows"]}
    assert [r["study"] for r in summary["rows"]] == ["baseline", "tiny"]  # the baseline first
    t, b = rows["tiny"], rows["baseline"]
    assert t["best_val_acc"] == study.best_value and t["best_val_acc_from"] == "storage"
    assert t["trial"] == study.best_trial.number and t["trial_val_acc"] == study.best_value
    assert t["test_acc"] == tiny["test_acc"] and b["test_acc"] == base["test_acc"]
    assert t["test_acc_mean"] == pytest.approx(np.mean(tiny["test_acc"]))
    assert t["test_acc_std"] == pytest.approx(np.std(tiny["test_acc"], ddof=1))
    assert t["diff_points"] == pytest.approx(100 * (np.mean(tiny["test_acc"]) - np.mean(base["test_acc"])))
    assert b["diff_points"] == 0.0 and b["default_params"] is True and b["best_val_acc"] is None
    assert t["params_count"] == tiny["params_count"] and t["hardware"] == tiny["hardware"]
    assert t["train_seconds"] == pytest.approx(np.mean(tiny["train_seconds"]))
    assert t["images_per_s"] == pytest.approx(np.mean(tiny["images_per_s"]))
    assert t["optuna_params"] == study.best_trial.params and t["params"] == tiny["params"]

    # Plot data: confusion summed over seeds; pruned trials present in the intermediate values.
    assert np.array(summary["confusion"]["tiny"]["counts"]).tolist() == np.sum(tiny["confusion"], axis=0).tolist()
    inter = summary["studies"]["tiny"]["intermediate"]["trials"]
    assert sorted(tr["state"] for tr in inter) == ["complete", "complete", "pruned"]
    assert sum(tr["best"] for tr in inter) >= 1
    hist = summary["studies"]["tiny"]["history"]
    assert hist["counts"]["pruned"] == 1 and hist["best_so_far"][-1]["value"] == study.best_value
    imp = summary["studies"]["tiny"]["importance"]
    assert imp["importances"] or imp["note"].startswith("skipped")
    assert imp["evaluator"] in (None, "PedAnovaImportanceEvaluator")  # works without scikit-learn

    md = (out / "summary.md").read_text()
    assert f"{100 * t['test_acc_mean']:.2f} ± {100 * t['test_acc_std']:.2f} (2)" in md
    assert f"{t['diff_points']:+.2f}" in md and "![accuracy.png](accuracy.png)" in md


def test_anytime_figure_charges_every_trial_its_device_time(env: SimpleNamespace, tmp_path: Path) -> None:
    from cifar_hpo.storage import record

    out = tmp_path / "report"
    assert cli.main(["report", "--results", str(env.results), "--storage", env.db, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "study_tiny_anytime.png" in summary["figures"] and (out / "study_tiny_anytime.png").is_file()
    anytime = summary["studies"]["tiny"]["anytime"]
    study = optuna.load_study(study_name="tiny", storage=env.db)
    trials = sorted(study.get_trials(), key=lambda t: (t.datetime_complete, t.number))
    assert [p["trial"] for p in anytime["points"]] == [t.number for t in trials]
    hours = [p["device_hours"] for p in anytime["points"]]
    assert hours == sorted(hours) and hours[-1] == pytest.approx(sum(record.device_seconds(t) for t in trials) / 3600)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sum(record.read(t).wall_s or 0 for t in complete) > 0  # complete trials are charged their recorded time
    assert anytime["points"][-1]["best"] == study.best_value
    assert (anytime["complete"], anytime["pruned"]) == (2, 1)
    base = load_final(env.results / "baseline" / "final.pt")
    assert anytime["baseline"]["device_hours"] == pytest.approx(np.mean(base["train_seconds"]) / 3600)
    assert anytime["baseline"]["test_acc"] == pytest.approx(np.mean(base["test_acc"]))
    assert "study tiny: best validation accuracy vs device time" in (out / "index.html").read_text()


def test_default_out_folder_and_no_storage(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "res"
    shutil.copytree(env.results / "tiny", results / "tiny")
    assert cli.main(["report", "--results", str(results)]) == 0  # default storage: results/cifar_hpo.db, absent
    assert (results / "report" / "summary.md").is_file()
    assert not (results / "cifar_hpo.db").exists()  # the report never creates a database
    summary = json.loads((results / "report" / "summary.json").read_text())
    row = summary["rows"][0]
    assert row["diff_points"] is None and row["best_val_acc_from"] == "checkpoint"
    assert any("no baseline final model" in n for n in summary["notes"])
    assert "retrain --study baseline --default-params" in capsys.readouterr().out


def test_importances_without_scikit_learn() -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=30)
    data = report_data.importance_data(study)
    assert data["evaluator"] == "PedAnovaImportanceEvaluator"
    assert max(data["importances"], key=data["importances"].get) == "x"
    few = optuna.create_study(direction="maximize")
    few.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert report_data.importance_data(few)["note"].startswith("skipped: 1 complete trial")


def test_bad_input(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(results: Path, message: str) -> None:
        capsys.readouterr()
        out = tmp_path / "out"
        assert cli.main(["report", "--results", str(results), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()  # nothing written

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "no final models in")
    fails(tmp_path / "missing", "cifar-hpo retrain --study NAME")

    mixed = tmp_path / "mixed"
    shutil.copytree(env.results / "tiny", mixed / "tiny")
    other = load_final(env.results / "baseline" / "final.pt")
    checkpoint.save({**other, "study": "zoo", "classes": ["ant", "bee", "cow"]}, mixed / "zoo" / "final.pt")
    fails(mixed, "final models disagree on classes")

    corrupt = tmp_path / "corrupt"
    (corrupt / "tiny").mkdir(parents=True)
    (corrupt / "tiny" / "final.pt").write_bytes(b"garbage")
    fails(corrupt, "cannot be loaded safely")


# ---------------------------------------------------------------- the HTML page in a real browser

HARNESS = """<script>
window.addEventListener("load", () => {
  document.body.dataset.images = JSON.stringify([...document.images].map(
    i => [i.dataset.name, i.complete, i.naturalWidth, i.naturalHeight]));
});
</script></body>"""


def test_report_page_renders_in_headless_chromium(env: SimpleNamespace, tmp_path: Path) -> None:
    from browser import chromium_or_skip, dump_dom, screenshot, table_rows, tags
    from PIL import Image

    chromium_or_skip()
    out = tmp_path / "report"
    assert cli.main(["report", "--results", str(env.results), "--storage", env.db, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    page = (out / "index.html").read_text()
    alone = tmp_path / "alone"  # the page alone, away from the PNGs: it must carry them itself
    alone.mkdir()
    (alone / "index.html").write_text(page)

    # Nothing from outside: every src is a data: URI; a CSP forbids the rest; no script in the page.
    all_tags = tags(page)
    assert not any(t == "script" for t, _ in all_tags)
    assert all(str(a.get("src", "data:")).startswith("data:") for _, a in all_tags)
    assert not any(str(a.get("href", "#")).startswith(("http:", "https:", "//")) for _, a in all_tags)
    assert "default-src 'none'" in page

    # Every figure loads, at the PNG's own size. The page has no JavaScript; this test copy adds a reporter.
    probe = tmp_path / "probe"
    probe.mkdir()
    csp = report_page.CSP
    (probe / "index.html").write_text(page.replace(csp, csp + "; script-src 'unsafe-inline'").replace("</body>", HARNESS))
    dom = dump_dom((probe / "index.html").as_uri())
    body = next(a for t, a in tags(dom) if t == "body")
    loaded = json.loads(str(body["data-images"]))
    assert [name for name, *_ in loaded] == summary["figures"]
    for name, complete, width, height in loaded:
        with Image.open(out / name) as im:
            assert complete and (width, height) == im.size, (name, width, height, im.size)

    # The table as the browser parsed it: one row per final model, numbers equal to summary.json.
    dom = dump_dom((alone / "index.html").as_uri())
    rows = {a["data-study"]: cells for a, cells in table_rows(dom, "comparison") if a.get("data-study")}
    assert list(rows) == [r["study"] for r in summary["rows"]] == ["baseline", "tiny"]
    for r in summary["rows"]:
        cells = rows[r["study"]]
        texts = [text for _, text in cells]
        assert texts[0] == r["label"]
        assert texts[1] == f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        assert float(str(cells[1][0]["data-value"])) == r["test_acc_mean"] and float(str(cells[1][0]["data-std"])) == r["test_acc_std"]
        assert texts[2] == str(r["seeds"])
        assert texts[3] == ("(baseline)" if r["study"] == "baseline" else f"{r['diff_points']:+.2f}")
        assert texts[4] == ("-" if r["best_val_acc"] is None else f"{100 * r['best_val_acc']:.2f}")
        assert texts[5] == f"{r['params_count']:,}" and texts[6] == f"{r['train_seconds']:.1f}"
        assert texts[8] == r["hardware"]
    tiny = next(r for r in summary["rows"] if r["study"] == "tiny")
    # The colour class follows the sign of the difference (a tie, possible on tiny data, gets none).
    d = tiny["diff_points"]
    assert rows["tiny"][3][0]["class"] == ("num pos" if d > 0 else "num neg" if d < 0 else "num")

    # Pruning statistics and provenance, also from summary.json.
    pruning = {a["data-study"]: [t for _, t in c] for a, c in table_rows(dom, "pruning") if a.get("data-study")}
    p = summary["studies"]["tiny"]["pruning"]
    assert pruning["tiny"][2:6] == [str(p["counts"][k]) for k in ("complete", "pruned", "fail", "running")] == ["2", "1", "0", "0"]
    assert pruning["tiny"][6:8] == [str(p["epochs_trained"]), str(p["epochs_unpruned"])] == ["3", "3"]
    prov = {a["data-study"]: [t for _, t in c] for a, c in table_rows(dom, "provenance") if a.get("data-study")}
    for d in summary["provenance"]:
        assert d["split_hash"] in prov[d["study"]][2] and "cat, dog, frog" in prov[d["study"]][5]
        assert prov[d["study"]][3] == f"{d['train_images']:,}" and prov[d["study"]][4] == f"{d['test_images']:,}"
    for key, value in tiny["params"].items():
        assert f"<code>{key}</code>" in page and html.escape(str(value)) in page

    png = screenshot((alone / "index.html").as_uri(), tmp_path / "page.png", size=(1280, 3000))
    if os.environ.get("CIFAR_HPO_KEEP_SCREENSHOTS"):  # to look at it: CIFAR_HPO_KEEP_SCREENSHOTS=folder
        shutil.copy(png, Path(os.environ["CIFAR_HPO_KEEP_SCREENSHOTS"]) / "report_page.png")
    with Image.open(png) as im:
        assert im.size == (1280, 3000)
        assert len(np.unique(np.asarray(im.convert("L").resize((64, 150))))) > 20  # drawn content, not a blank page
