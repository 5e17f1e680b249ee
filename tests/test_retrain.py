"""`cifar-hpo retrain`: replay of the best trial, final.pt contents, resume, defaults, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import cli
from cifar_hpo.models import final as finalmodel
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint
from cifar_hpo.study import retrain


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished 2-trial study of baseline_cnn on a 3-class synthetic folder."""
    root = tmp_path_factory.mktemp("final")
    folder = make_image_folder(root / "imgs", n_train=20, n_test=6)
    study_file = root / "tiny.toml"
    study_file.write_text(study_toml(epochs=2, trials=2))
    db = f"sqlite:///{root}/db.sqlite3"
    cache = root / "cache"
    code = cli.main(["run", "--study", str(study_file), "--data", str(folder), "--storage", db, "--results", str(root / "runs"),
                     "--cache-dir", str(cache), "--trials", "2", "--device", "cpu"])  # fmt: skip
    assert code == 0
    return SimpleNamespace(root=root, folder=folder, study_file=study_file, db=db, cache=cache)


def _retrain(env: SimpleNamespace, results: Path, *extra: str, study: str | None = None) -> int:
    return cli.main(["retrain", "--study", study or str(env.study_file), "--storage", env.db, "--results", str(results),
                     "--cache-dir", str(env.cache), "--device", "cpu", *extra])  # fmt: skip


def _study(env: SimpleNamespace, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=env.db)


def _final_data(env: SimpleNamespace, f: dict) -> object:
    from cifar_hpo import data

    ds = data.load_dataset(str(env.folder), cache_dir=env.cache, progress=False)
    split = data.split_dataset(ds, val_fraction=f["data"]["val_fraction"], seed=f["data"]["split_seed"], subset=f["data"]["subset"])
    return data.final_data(ds, split, torch.device("cpu"))


def test_retrain_best_trial_writes_complete_safe_checkpoint(env: SimpleNamespace, tmp_path: Path) -> None:
    results = tmp_path / "res"
    assert _retrain(env, results, "--seeds", "2") == 0
    path = results / "tiny" / "final.pt"
    f = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert set(finalmodel.FINAL_KEYS) <= set(f)
    study = _study(env)
    best = study.best_trial
    assert f["study"] == "tiny" and f["trial"] == best.number and f["default_params"] is False
    assert f["params"] == best.user_attrs["trial_params"]  # the replay equals what the trial trained with
    assert f["optuna_params"] == best.params
    assert f["trial_value"] == best.value == f["best_value"]
    assert f["split_hash"] == study.user_attrs["split_hash"]  # the study's split, train+val used
    assert f["classes"] == ["cat", "dog", "frog"] and f["input_size"] == [3, 32, 32]
    assert f["seeds"] == [0, 1] and f["weights_seed"] == 0 and f["epochs"] == 2
    assert f["data"]["train_images"] == 60 and f["data"]["test_images"] == 18
    assert len(f["test_acc"]) == 2 and f["test_acc_mean"] == pytest.approx(np.mean(f["test_acc"]))
    assert f["test_acc_std"] == pytest.approx(np.std(f["test_acc"], ddof=1))
    for seed in range(2):
        confusion = np.array(f["confusion"][seed])
        assert confusion.sum() == 18
        assert np.trace(confusion) / 18 == pytest.approx(f["test_acc"][seed])
        assert f["per_class_acc"][seed] == pytest.approx(list(confusion.diagonal() / confusion.sum(1)))
        assert [e["epoch"] for e in f["histories"][seed]["epochs"]] == [1, 2]
    assert f["hardware"].startswith("cpu") and "torch" in f["versions"]
    assert not (results / "tiny" / "retrain").exists()  # partials and done files removed
    assert (results / "tiny" / "final.json").is_file()

    # The weights in the file are the ones that were tested: the same predictions again.
    from cifar_hpo import training as train

    dd = _final_data(env, f)
    model = finalmodel.build_model(finalmodel.load_final(path))
    metrics = train.evaluate(model, dd.eval_x, dd.eval_y, mean=tuple(f["mean"]), std=tuple(f["std"]))
    assert metrics.confusion.tolist() == f["confusion"][0]
    assert metrics.acc == pytest.approx(f["test_acc"][0])


def test_retrain_other_trial_and_epochs(env: SimpleNamespace, tmp_path: Path) -> None:
    other = next(t for t in _study(env).get_trials() if t.number != _study(env).best_trial.number)
    assert _retrain(env, tmp_path / "res", "--trial", str(other.number), "--epochs", "1") == 0
    f = checkpoint.load(tmp_path / "res" / "tiny" / "final.pt")
    assert f["trial"] == other.number and f["epochs"] == 1 and len(f["histories"][0]["epochs"]) == 1
    assert f["params"] == other.user_attrs["trial_params"]


def test_interrupted_retrain_resumes_from_last_epoch(env: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    results = tmp_path / "res"
    real_save = checkpoint.save

    def save_then_interrupt(obj: object, path: Path) -> None:
        real_save(obj, path)
        if str(path).endswith(".partial.pt"):
            raise KeyboardInterrupt  # as if Ctrl-C came right after epoch 1's snapshot

    monkeypatch.setattr(checkpoint, "save", save_then_interrupt)
    assert _retrain(env, results) == 130
    partial = results / "tiny" / "retrain" / "seed0.partial.pt"
    assert checkpoint.load(partial)["snapshot"]["epoch"] == 1
    assert not (results / "tiny" / "final.pt").exists()
    monkeypatch.setattr(checkpoint, "save", real_save)
    capsys.readouterr()

    assert _retrain(env, results) == 0
    out = capsys.readouterr().out
    assert "resuming from epoch 1/2" in out
    assert "epoch   1/2" not in out and "epoch   2/2" in out  # only epoch 2 was trained again
    resumed = checkpoint.load(results / "tiny" / "final.pt")
    assert [e["epoch"] for e in resumed["histories"][0]["epochs"]] == [1, 2]
    assert not partial.exists()

    # Resuming gives the same model as an uninterrupted run.
    assert _retrain(env, tmp_path / "straight") == 0
    straight = checkpoint.load(tmp_path / "straight" / "tiny" / "final.pt")
    assert resumed["test_acc"] == straight["test_acc"]
    for k, v in straight["model_state"].items():
        torch.testing.assert_close(resumed["model_state"][k], v)


def test_finished_seeds_are_skipped_and_foreign_partials_ignored(env: SimpleNamespace, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    results = tmp_path / "res"
    assert _retrain(env, results, "--epochs", "1", "--seeds", "2") == 0
    f = checkpoint.load(results / "tiny" / "final.pt")
    # Fake an interrupted 2-seed run: seed 0 done, seed 1 with a partial of another epoch budget.
    folder = results / "tiny" / "retrain"
    done = {"identity": {"study": "tiny", "trial": f["trial"], "default_params": False, "params": f["params"], "epochs": 1,
                         "split_hash": f["split_hash"], "classes": f["classes"]},
            "seed": 0, "test_acc": 0.123, "test_loss": 1.0, "per_class_acc": [0.1, 0.2, 0.0], "confusion": f["confusion"][0],
            "history": f["histories"][0], "seconds": 1.0, "images_per_s": 1.0, "peak_mem_mb": 1.0,
            "params_count": f["params_count"], "model_state": f["model_state"]}  # fmt: skip
    checkpoint.save(done, folder / "seed0.done.pt")
    foreign = {"identity": {**done["identity"], "epochs": 7}, "snapshot": {"epoch": 3}}
    checkpoint.save(foreign, folder / "seed1.partial.pt")
    capsys.readouterr()
    assert _retrain(env, results, "--epochs", "1", "--seeds", "2") == 0
    out = capsys.readouterr().out
    assert "[seed 0 (1/2)] already finished" in out
    assert "ignoring" in out and "seed1.partial.pt" in out and "epochs" in out
    again = checkpoint.load(results / "tiny" / "final.pt")
    assert again["test_acc"][0] == 0.123  # taken from the done file, not retrained


def test_partial_with_other_classes_is_refused(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "res"
    partial = results / "tiny" / "retrain" / "seed0.partial.pt"
    checkpoint.save({"identity": {"classes": ["x", "y", "z"], "epochs": 2}, "snapshot": {}}, partial)
    assert _retrain(env, results) == 2
    err = capsys.readouterr().err
    assert "seed0.partial.pt" in err and "classes" in err and "Traceback" not in err
    assert partial.exists() and not (results / "tiny" / "final.pt").exists()


def test_default_params_make_the_baseline_without_a_study(env: SimpleNamespace, tmp_path: Path) -> None:
    from cifar_hpo.models import default_params

    base_file = tmp_path / "baseline.toml"
    base_file.write_text(study_toml(epochs=2, trials=2))
    results = tmp_path / "res"
    code = cli.main(["retrain", "--study", str(base_file), "--default-params", "--data", str(env.folder), "--epochs", "1",
                     "--storage", f"sqlite:///{tmp_path}/absent.db", "--results", str(results), "--cache-dir", str(env.cache),
                     "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert not (tmp_path / "absent.db").exists()  # no database created
    f = checkpoint.load(results / "baseline" / "final.pt")
    assert f["default_params"] is True and f["trial"] is None and f["best_value"] is None
    assert TrialParams.from_dict(f["params"]) == default_params("baseline_cnn", "cpu")


def test_default_params_of_a_study_use_its_data(env: SimpleNamespace, tmp_path: Path) -> None:
    from cifar_hpo.models import default_params

    assert _retrain(env, tmp_path / "res", "--default-params", "--epochs", "1") == 0  # no --data: the study's
    f = checkpoint.load(tmp_path / "res" / "tiny" / "final.pt")
    assert f["default_params"] is True and f["trial"] is None
    assert f["split_hash"] == _study(env).user_attrs["split_hash"]
    assert f["best_value"] == _study(env).best_value
    assert TrialParams.from_dict(f["params"]) == default_params("baseline_cnn", "cpu")


@pytest.fixture(scope="module")
def unfinished(env: SimpleNamespace) -> Path:
    """A study 'unfinished' with one failed and one pruned trial, and its study file."""
    study = optuna.create_study(study_name="unfinished", storage=env.db, direction="maximize")
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.2}))
    path = env.root / "unfinished.toml"
    path.write_text(study_toml(epochs=2, trials=2))
    return path


@pytest.mark.parametrize(
    ("study", "extra", "message"),
    [
        ("no_such_study", [], "unknown study 'no_such_study'; valid: baseline"),
        ("FILE:ghost", [], "no study 'ghost' in sqlite:///"),
        ("FILE:unfinished", [], "study 'unfinished' has no complete trial"),
        ("FILE:unfinished", ["--trial", "1"], "trial 1 of study 'unfinished' is pruned, not complete"),
        ("FILE:tiny", ["--trial", "99"], "study 'tiny' has no trial 99"),
        ("FILE:tiny", ["--trial", "0", "--default-params"], "--trial and --default-params exclude each other"),
        ("FILE:tiny", ["--seeds", "0"], "--seeds must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(env: SimpleNamespace, unfinished: Path, tmp_path: Path, study: str,
                                                  extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    if study.startswith("FILE:"):
        name = study[5:]
        path = tmp_path / f"{name}.toml"
        shutil.copy(env.study_file, path)
        study = str(path)
    results = tmp_path / "res"
    assert _retrain(env, results, *extra, study=study) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not results.exists()


def test_missing_database_is_named(env: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["retrain", "--study", str(env.study_file), "--storage", f"sqlite:///{tmp_path}/none.db",
                     "--results", str(tmp_path / "res")])  # fmt: skip
    assert code == 2
    assert "no study database at sqlite:///" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_replay_prefers_stored_params_when_the_search_space_changed(env: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_hpo.study.spec import load_spec

    spec = load_spec(str(env.study_file))
    best = _study(env).best_trial
    assert retrain.replay_params(spec, best).to_dict() == best.user_attrs["trial_params"]
    edited = optuna.trial.create_trial(
        params=best.params, distributions=best.distributions, value=best.value,
        user_attrs={"trial_params": {**best.user_attrs["trial_params"], "dropout": 0.25}},
    )  # fmt: skip
    assert retrain.replay_params(spec, edited).dropout == 0.25
    assert "replays trial" in capsys.readouterr().err


def test_replay_of_a_probe_fidelity_trial_is_what_it_trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The probe fidelity trains every trial with the wsd schedule (pruning.trial_params); the
    # replay must apply the same rewrite, or it "finds" an edited search space and warns.
    from conftest import study_toml

    from cifar_hpo.study import pruning
    from cifar_hpo.study.search_space import suggest_params
    from cifar_hpo.study.spec import load_spec

    path = tmp_path / "probe.toml"
    path.write_text(study_toml(epochs=10, pruner="successive_halving") + 'fidelity = "probe"\n')
    spec = load_spec(str(path))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    stored = pruning.trial_params(spec, suggest_params(spec, trial))  # what the objective stores and trains
    trial.set_user_attr("trial_params", stored.to_dict())
    study.tell(trial, 0.5)
    assert stored.schedule == "wsd" and trial.params["schedule"] != "wsd"  # the fidelity did rewrite the schedule
    capsys.readouterr()
    assert retrain.replay_params(spec, study.trials[0]) == stored
    assert capsys.readouterr().err == ""
