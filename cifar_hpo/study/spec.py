"""StudySpec: one study file (``studies/<name>.toml``) loaded and validated.

    cifar-hpo studies                 # lists the bundled study files
    cifar-hpo run --study fast        # a bundled study by name
    cifar-hpo run --study my.toml     # or a path to your own file

A study file names its model, search space, epochs per trial, trial count,
sampler, pruner, seed and data. Unknown keys and bad values are rejected with
the file and key named. The name of the study in the database is the file's
stem unless the file sets ``name``. ``recipe = "cpu"`` (default) or ``"gpu"``
picks the model's default recipe (`models.Model.recipes`) that the search space
searches around and ``retrain --default-params`` trains: it is part of the
study, so every worker and every replay search the same space on any machine.
An ``[arch]`` table changes the model's architecture options in that recipe
(``studies/fast_light.toml``: fast_cnn's light network).

The bundled study files and search spaces are the repository's ``studies/`` and
``search_spaces/`` folders; an installed wheel holds them as the package
resources ``cifar_hpo/studies`` and ``cifar_hpo.search_spaces`` (see `bundled`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_hpo.errors import UserError
from cifar_hpo.study.search_space import bundled, default_recipe, load_search_space

if TYPE_CHECKING:

    pass


SAMPLERS = ("tpe", "random")  # pruner kinds and fidelities: cifar_hpo.study.pruning's PRUNERS and FIDELITIES


# Seeds reach numpy's legacy RandomState through Optuna's samplers (0 <= seed < 2**32), and torch
# after `study.objective` and `training` multiply them (seed * 100003 * 7919 must stay below 2**64).
SEED_LIMIT = 2**31


MAX_EPOCHS = 10_000  # per trial: beyond this a study never ends (an epoch of the full split takes seconds at best)


MAX_TRIALS = 100_000  # finished trials a study ends with


@dataclass(frozen=True)
class SamplerSpec:
    """Which Optuna sampler proposes parameters."""

    kind: str = "tpe"
    multivariate: bool = True  # TPE: model parameters jointly, not one by one
    n_startup_trials: int = 8  # random trials before TPE takes over


@dataclass(frozen=True)
class PrunerSpec:
    """Which Optuna pruner stops bad trials early; resources are epochs."""

    kind: str = "promote"  # pause and promote (study.scheduling), measured with `cifar-hpo bench search` (docs/pruning.md)
    min_resource: int = 1  # epochs a trial trains before it can be paused or pruned
    reduction_factor: int = 3  # promote / hyperband / successive halving: 1/rf go on from each rung
    n_startup_trials: int = 5  # median: trials that are never pruned
    n_warmup_steps: int = 1  # median: epochs before pruning starts
    # What a rung compares (cifar_hpo.study.pruning): "plain" accuracy, a "probe" (wsd schedule,
    # cooldown branch at each rung) or an "ema" of the weights; plain measured best (docs/pruning.md).
    fidelity: str = "plain"
    keep: int = 1  # rung_top_k: a trial continues past a rung while fewer than this many did better there


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how train is split."""

    source: str = "cifar10"
    val_fraction: float = 0.1  # held out of train for validation
    split_seed: int = 42  # the original project's random_split seed
    subset: int | None = None  # stratified subset of N training images (quick runs)


@dataclass(frozen=True)
class StudySpec:
    """A resolved study file."""

    name: str
    description: str
    model: str
    search_space: str  # module in search_spaces/
    recipe: str  # the model's default recipe searched around: "cpu" or "gpu" (models.DEVICE_KINDS)
    epochs: int  # per trial, the pruner's max resource
    trials: int  # finished (complete + pruned) trials the study ends with
    seed: int
    sampler: SamplerSpec
    pruner: PrunerSpec
    data: DataSpec
    direction: str = "maximize"  # validation accuracy
    path: str = ""
    # [arch]: the model's architecture options (`models.Model.arch_keys`) changed from its
    # default recipe, e.g. fast_cnn's light network: width = 0.5, stem_stride = 2.
    arch: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The study's compute budget in device-seconds over all its trials, workers and machines
    # (``budget = "2h"``, or ``run --budget``; `cifar_hpo.study.budget`); None: sized in trials only.
    budget_s: float | None = None
    # TrialParams fields fixed for every trial after its search space (``run --set KEY=VALUE``, e.g.
    # pretrained=false where ImageNet weights cannot be had): recorded with the study, replayed by retrain.
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as written beside the results."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> StudySpec:
        """A copy with top-level fields changed."""
        return dataclasses.replace(self, **changes)

    def with_overrides(
        self,
        *,
        epochs: int | None = None,
        trials: int | None = None,
        data: str | None = None,
        subset: int | None = None,
        budget: str | None = None,
        params: list[str] | None = None,
    ) -> StudySpec:
        """Apply CLI overrides (None = keep the file's value), validated."""
        where = "command line"
        spec = self
        if params:
            spec = spec.replace(params={**spec.params, **_fixed_params(spec, params)})
        if budget is not None:
            spec = spec.replace(budget_s=_budget_seconds(budget, "--budget"))
        if epochs is not None:
            _check_count(epochs, where, "--epochs", MAX_EPOCHS)
            spec = spec.replace(epochs=epochs)
        if trials is not None:
            _check_count(trials, where, "--trials", MAX_TRIALS)
            spec = spec.replace(trials=trials)
        if data is not None or subset is not None:
            d = spec.data
            if data is not None:
                d = dataclasses.replace(d, source=data)
            if subset is not None:
                _check(subset >= 20, where, "--subset", f"must be >= 20 images, got {subset}")
                d = dataclasses.replace(d, subset=subset)
            spec = spec.replace(data=d)
        return spec


def _check(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{where}: {key} {message}")


def _fixed_params(spec: StudySpec, pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` as checked TrialParams changes of the study model's recipe (`models.checked_changes`)."""
    from cifar_hpo.models import checked_changes  # torch: loading a spec without --set does not need it

    return checked_changes(default_recipe(spec), pairs)


def _budget_seconds(text: str, where: str) -> float:
    """Device-seconds of a budget such as ``90m`` or ``2h`` (`budget.parse_duration`)."""
    from cifar_hpo.study.budget import parse_duration  # imports optuna; loading a spec imports neither optuna nor torch

    return parse_duration(text, where)


def _check_count(value: int, where: str, key: str, most: int) -> None:
    """``value`` counts something (epochs, trials): at least 1 and at most ``most``."""
    _check(value >= 1, where, key, f"must be >= 1, got {value}")
    _check(value <= most, where, key, f"must be <= {most:,}, got {value:,}")


def _check_seed(value: int, where: str, key: str) -> None:
    """``value`` seeds something: in [0, `SEED_LIMIT`)."""
    _check(0 <= value < SEED_LIMIT, where, key, f"must be in [0, 2**31) (numpy, torch and Optuna seed from it), got {value}")


def _section(cls: type, raw: Any, where: str, key: str) -> Any:
    """Build a section dataclass from a TOML table, rejecting unknown keys and wrong types."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: [{key}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {key}.{unknown[0]}; valid keys of [{key}]: {', '.join(fields)}")
    defaults = cls()
    for name, value in raw.items():
        expected = type(getattr(defaults, name))
        if getattr(defaults, name) is None:
            expected = int
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            raw = {**raw, name: value}
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UserError(f"{where}: {key}.{name} must be {expected.__name__}, got {value!r}")
    return cls(**raw)


TOP_KEYS = {
    "name": str,
    "description": str,
    "model": str,
    "search_space": str,
    "recipe": str,
    "epochs": int,
    "trials": int,
    "seed": int,
    "direction": str,
    "budget": str,
}


def parse_spec(raw: dict[str, Any], path: Path) -> StudySpec:
    """Validate a parsed TOML document; every error names the file and key."""
    where = str(path)
    sections = {"sampler": SamplerSpec, "pruner": PrunerSpec, "data": DataSpec}
    unknown = sorted(set(raw) - set(TOP_KEYS) - set(sections) - {"arch"})
    if unknown:
        valid = ", ".join([*TOP_KEYS, *(f"[{s}]" for s in [*sections, "arch"])])
        raise UserError(f"{where}: unknown key {unknown[0]!r}; valid keys: {valid}")
    for key in ("model", "search_space", "epochs", "trials"):
        if key not in raw:
            raise UserError(f"{where}: missing required key {key!r}")
    for key, typ in TOP_KEYS.items():
        if key in raw and (not isinstance(raw[key], typ) or isinstance(raw[key], bool)):
            raise UserError(f"{where}: {key} must be {typ.__name__}, got {raw[key]!r}")
    sampler = _section(SamplerSpec, raw.get("sampler"), where, "sampler")
    pruner = _section(PrunerSpec, raw.get("pruner"), where, "pruner")
    data = _section(DataSpec, raw.get("data"), where, "data")
    spec = StudySpec(
        name=raw.get("name", path.stem),
        description=raw.get("description", ""),
        model=raw["model"],
        search_space=raw["search_space"],
        recipe=raw.get("recipe", "cpu"),
        epochs=raw["epochs"],
        trials=raw["trials"],
        seed=raw.get("seed", 0),
        sampler=sampler,
        pruner=pruner,
        data=data,
        direction=raw.get("direction", "maximize"),
        path=str(path),
        arch=_arch_table(raw.get("arch"), where),
        budget_s=None if "budget" not in raw else _budget_seconds(raw["budget"], f"{where}: budget"),
    )
    _validate(spec, where)
    return spec


def _arch_table(raw: Any, where: str) -> dict[str, Any]:
    """The ``[arch]`` table: option -> number, bool, string or list (the model's rules are checked in `_validate`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: [arch] must be a table, e.g. [arch] width = 0.5")
    for key, value in raw.items():
        if not isinstance(value, int | float | bool | str | list):
            raise UserError(f"{where}: arch.{key} must be a number, true/false, a string or a list, got {value!r}")
    return dict(raw)


# A study's name is a folder under --results (and retrain deletes folders by it): one safe path component.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_study_name(name: str, where: str = "study") -> str:
    """``name`` if it is a safe study name (letters, digits, ``_ . -``; no path separators), else UserError."""
    if not NAME_RULE.fullmatch(name):
        raise UserError(
            f"{where}: study name {name!r} is not allowed; use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (set name = ... in the study file, or rename the file)"
        )
    return name


def _validate(spec: StudySpec, where: str) -> None:
    from cifar_hpo.models import DEVICE_KINDS, MODELS  # torch import only when a spec is validated
    from cifar_hpo.study import pruning  # likewise: optuna and torch only when a spec is validated

    check_study_name(spec.name, where)
    _check(spec.model in MODELS, where, "model", f"{spec.model!r} is unknown; valid: {', '.join(MODELS)}")
    entry = MODELS[spec.model]
    for key in spec.arch:
        valid = ", ".join(sorted(entry.arch_keys)) or "none"
        _check(key in entry.arch_keys, where, f"arch.{key}", f"is not an option of {spec.model}; valid: {valid}")
    bad = entry.arch_problem(spec.arch)  # checked here, not in 5 failed trials (`models.Model.arch_rules`)
    if bad is not None:
        raise UserError(f"{where}: arch.{bad[0]} {bad[1]}")
    _check(spec.recipe in DEVICE_KINDS, where, "recipe", f"must be one of {', '.join(DEVICE_KINDS)}, got {spec.recipe!r}")
    _check_count(spec.epochs, where, "epochs", MAX_EPOCHS)
    _check_count(spec.trials, where, "trials", MAX_TRIALS)
    _check_seed(spec.seed, where, "seed")
    _check_seed(spec.data.split_seed, where, "data.split_seed")
    _check(spec.direction == "maximize", where, "direction", "must be 'maximize' (the score is validation accuracy)")
    _check(spec.sampler.kind in SAMPLERS, where, "sampler.kind", f"must be one of {', '.join(SAMPLERS)}")
    _check(spec.pruner.kind in pruning.PRUNERS, where, "pruner.kind", f"must be one of {', '.join(pruning.PRUNERS)}")
    _check(spec.pruner.min_resource >= 1, where, "pruner.min_resource", "must be >= 1")
    _check(spec.pruner.fidelity in pruning.FIDELITIES, where, "pruner.fidelity", f"must be one of {', '.join(pruning.FIDELITIES)}")
    _check(spec.pruner.reduction_factor >= 2, where, "pruner.reduction_factor", "must be >= 2")
    _check(spec.pruner.keep >= 1, where, "pruner.keep", "must be >= 1")
    _check(spec.pruner.kind != "promote" or spec.pruner.fidelity == "plain", where, "pruner.fidelity",
           "must be 'plain' with kind = 'promote' (pause and promote ranks the plain accuracy)")  # fmt: skip
    _check(0.0 < spec.data.val_fraction < 1.0, where, "data.val_fraction", "must be in (0, 1)")
    _check(spec.data.subset is None or spec.data.subset >= 20, where, "data.subset", "must be >= 20")
    load_search_space(spec.search_space, where=f"{where}: search_space")


def resolve_path(name_or_path: str, studies_dir: Path | None = None) -> Path:
    """A study name (bundled file) or a path to a .toml file."""
    folder = studies_dir or STUDIES_DIR
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or "/" in name_or_path:
        if not candidate.is_file():
            raise UserError(f"study file {candidate} does not exist; check the path or use a name from `cifar-hpo studies`")
        return candidate
    path = folder / f"{name_or_path}.toml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.toml")))
        raise UserError(f"unknown study {name_or_path!r}; valid: {names} (or pass a path to a .toml file)")
    return path


def load_spec(name_or_path: str, studies_dir: Path | None = None) -> StudySpec:
    """Load and validate a study by bundled name or file path.

    Raises:
        UserError: unknown study, unreadable or malformed TOML, unknown key, bad value.
    """
    path = resolve_path(name_or_path, studies_dir)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    return parse_spec(raw, path)


def list_specs(studies_dir: Path | None = None) -> list[StudySpec]:
    """Every valid study file in the folder, sorted by name."""
    folder = studies_dir or STUDIES_DIR
    return [load_spec(str(p)) for p in sorted(folder.glob("*.toml"))]


def save_resolved(spec: StudySpec, folder: Path) -> Path:
    """Write the resolved spec beside the results (``spec.json``)."""
    from cifar_hpo.storage.checkpoint import atomic_write_bytes  # imports torch; loading a spec does not need it

    path = folder / "spec.json"
    atomic_write_bytes(path, (json.dumps(spec.to_dict(), indent=2) + "\n").encode(), mode=0o644)
    return path


STUDIES_DIR = bundled("studies")
