"""Study files, search spaces and their error messages."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from cifar_hpo import cli
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.study.search_space import default_recipe, load_search_space
from cifar_hpo.study.spec import STUDIES_DIR, list_specs, load_spec

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
    # Every bundled study pauses and promotes (docs/pruning.md), on the plain accuracy, from epoch 1, a third going on.
    assert {(s.pruner.kind, s.pruner.min_resource, s.pruner.reduction_factor, s.pruner.fidelity) for s in specs.values()} == {
        ("promote", 1, 3, "plain")}  # fmt: skip


@pytest.mark.parametrize("path", sorted(STUDIES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_search_space_replays_with_fixed_trial(path: Path) -> None:
    spec = load_spec(str(path))
    module = load_search_space(spec.search_space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = module.suggest(trial, default_recipe(spec))
    assert isinstance(params, TrialParams) and params.model == spec.model
    replay = module.suggest(optuna.trial.FixedTrial(trial.params), default_recipe(spec))
    assert replay == params


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
        (GOOD + "[arch]\nwidth = 0.5\n", "arch.width is not an option of baseline_cnn"),
        ("arch = 3\n" + GOOD, "[arch] must be a table"),
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


def test_recipe_is_chosen_by_the_study_file_not_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    fast = load_spec("fast")
    assert fast.recipe == "cpu"
    gpu_file = tmp_path / "fast_gpu.toml"
    gpu_file.write_text((STUDIES_DIR / "fast.toml").read_text().replace('recipe = "cpu"', 'recipe = "gpu"'))
    gpu = load_spec(str(gpu_file))
    assert gpu.recipe == "gpu" and gpu.to_dict()["recipe"] == "gpu"  # recorded with the study
    module = load_search_space("fast")
    fixed = {"lr": 0.5, "batch_size": 256, "weight_decay": 1e-4, "label_smoothing": 0.1, "aug_strength": 0.5, "warmup_frac": 0.1,
             "norm_lr_scale": 32.0}  # fmt: skip
    seen = []
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        seen.append((module.suggest(optuna.trial.FixedTrial(fixed), default_recipe(fast)),
                     module.suggest(optuna.trial.FixedTrial(fixed), default_recipe(gpu))))  # fmt: skip
    assert seen[0] == seen[1]  # the same space on a CPU-only and a CUDA machine
    cpu_params, gpu_params = seen[0]
    assert cpu_params.norm_lr_scale == gpu_params.norm_lr_scale == 32.0
    # The same airbench network on both; both autocast to bf16 where it pays (CUDA, CPUs with AMX).
    assert cpu_params.arch == gpu_params.arch and cpu_params.arch["width"] == 1.0
    assert cpu_params.precision == gpu_params.precision == "auto"  # bf16 where it pays (train._use_bf16)


def test_bad_recipe_names_the_choices(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('recipe = "tpu"\n' + GOOD)
    with pytest.raises(UserError, match=r"bad.toml: recipe must be one of cpu, gpu, got 'tpu'"):
        load_spec(str(f))


def test_bundled_folders_ship_inside_the_package(tmp_path: Path) -> None:
    """pyproject.toml maps studies/ and search_spaces/ into the package; none is a top-level package."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"cifar_hpo.studies": "studies", "cifar_hpo.search_spaces": "search_spaces"}
    assert "*.toml" in tool["package-data"]["cifar_hpo.studies"]
    assert all(p.startswith("cifar_hpo") for p in tool["packages"])
    packages = {p.name for p in (root / "cifar_hpo").iterdir() if (p / "__init__.py").is_file()}
    assert {f"cifar_hpo.{p}" for p in packages} <= set(tool["packages"])  # e.g. cifar_hpo.bench
    assert load_search_space("fast").__name__ == "cifar_hpo.search_spaces.fast"


def test_bundled_folders_come_from_the_package_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.resources

    from cifar_hpo.study import search_space as spec

    site = tmp_path / "site-packages"  # an installed wheel: no pyproject.toml beside the package
    (site / "cifar_hpo" / "studies").mkdir(parents=True)
    monkeypatch.setattr(importlib.resources, "files", lambda name: site / "cifar_hpo")
    assert spec.bundled("studies") == site / "cifar_hpo" / "studies"
    checkout = tmp_path / "repo"  # a source checkout: its top-level folders win
    (checkout / "cifar_hpo").mkdir(parents=True)
    (checkout / "studies").mkdir()
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(importlib.resources, "files", lambda name: checkout / "cifar_hpo")
    assert spec.bundled("studies") == checkout / "studies"


def test_studies_command_refuses_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An empty listing with exit 0 is how a wheel without its study files looked.
    assert cli.main(["studies", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study files" in err and str(tmp_path) in err


def test_arch_table_changes_the_recipes_network(tmp_path: Path) -> None:
    spec = load_spec("fast_light")
    fast = default_recipe(load_spec("fast"))
    light = default_recipe(spec)
    assert light.arch == {**fast.arch, "width": 0.5, "stem_stride": 2}  # the rest of the recipe's arch kept
    assert light.replace(arch=fast.arch) == fast  # and nothing else changed
    f = tmp_path / "mine.toml"
    f.write_text('model = "fast_cnn"\nsearch_space = "fast"\nepochs = 2\ntrials = 2\n[arch]\nwidht = 0.5\n')
    with pytest.raises(UserError, match=r"arch.widht is not an option of fast_cnn; valid: .*width"):
        load_spec(str(f))


def test_retrain_help_says_default_params_trains_the_registry_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    # It said "the search space's defaults": a search space has none, retrain --default-params trains models.MODELS' recipe.
    with pytest.raises(SystemExit):
        cli.main(["retrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--default-params train the model's registry recipe (the study's recipe kind), not a trial" in text
    assert "search space's defaults" not in text
