"""Study files, search spaces and their error messages."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from cifar_hpo import cli
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.spec import STUDIES_DIR, list_specs, load_search_space, load_spec

GOOD = """
model = "baseline_cnn"
search_space = "baseline"
epochs = 3
trials = 4
[pruner]
kind = "median"
"""


def test_every_bundled_study_loads() -> None:
    specs = {s.name: s for s in list_specs()}
    assert {"baseline", "mlp", "resnet18", "densenet", "fast"} <= set(specs)
    assert specs["densenet"].model == "densenet121"
    assert specs["baseline"].sampler.kind == "tpe" and specs["baseline"].sampler.multivariate
    assert specs["fast"].pruner.kind == "successive_halving" and specs["fast"].pruner.fidelity == "probe"


@pytest.mark.parametrize("path", sorted(STUDIES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_search_space_replays_with_fixed_trial(path: Path) -> None:
    spec = load_spec(str(path))
    module = load_search_space(spec.search_space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = module.suggest(trial)
    assert isinstance(params, TrialParams) and params.model == spec.model
    replay = module.suggest(optuna.trial.FixedTrial(trial.params))
    assert replay == params
    assert isinstance(module.defaults(), TrialParams)


def test_user_file_by_path(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    spec = load_spec(str(f))
    assert spec.name == "mine" and spec.epochs == 3 and spec.pruner.kind == "median"
    assert spec.data.val_fraction == 0.1


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("colour = 'red'\n" + GOOD, "unknown key 'colour'"),
        (GOOD.replace("epochs = 3", "epochs = 'three'"), "epochs must be int"),
        (GOOD.replace("epochs = 3", "epochs = 0"), "epochs must be >= 1"),
        (GOOD.replace('"baseline_cnn"', '"vgg99"'), "'vgg99' is unknown; valid: "),
        (GOOD.replace('search_space = "baseline"', 'search_space = "nope"'), "'nope' not found"),
        (GOOD.replace('kind = "median"', 'kind = "magic"'), "pruner.kind must be one of"),
        (GOOD + "[data]\nval_fraction = 1.5\n", "data.val_fraction must be in (0, 1)"),
        (GOOD.replace("[pruner]", "[pruner]\npatience = 3"), "unknown key pruner.patience"),
        ("model = [", "not valid TOML"),
        (GOOD.replace("trials = 4", ""), "missing required key 'trials'"),
    ],
)
def test_bad_study_file_is_one_clear_line(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_spec(str(f))
    assert fragment in str(e.value) and str(f) in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_study_lists_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--study", "nosuch", "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown study 'nosuch'" in err and "densenet" in err and "Traceback" not in err


def test_studies_command_lists_each_with_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["studies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(list(STUDIES_DIR.glob("*.toml")))
    assert any(line.startswith("densenet") and "DenseNet121" in line for line in out)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    names = list(cli.COMMANDS) + [f"bench {w}" for w in ("data", "train", "time-to-accuracy", "pruning", "faults", "curves", "search")]
    for name in names:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*name.split(), "--help"])
        assert e.value.code == 0
        assert "usage: cifar-hpo" in capsys.readouterr().out
