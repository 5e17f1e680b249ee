"""Search spaces: the bundled ``search_spaces/`` modules, loaded by name, run around the model's recipe.

    from cifar_hpo.study.search_space import suggest_params
    params = suggest_params(spec, trial)     # search_spaces/<spec.search_space>.py: suggest(trial, recipe)

A search space module defines ``suggest(trial, recipe) -> TrialParams`` and only calls
``trial.suggest_*``, so the best trial replays exactly through ``optuna.trial.FixedTrial``.
``recipe`` is the study model's default recipe (`default_recipe`).
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams

if TYPE_CHECKING:
    import optuna

    from cifar_hpo.study.spec import StudySpec


def bundled(folder: str) -> Path:
    """The bundled ``studies`` or ``search_spaces`` folder.

    In a source checkout (editable install, or the checkout on ``PYTHONPATH``) these
    are the repository's top-level folders beside the package, where people edit
    them; installed from a wheel they are resources inside the package
    (pyproject.toml maps them there). The checkout wins where both exist, so the
    code that runs is the code beside it.
    """
    package = Path(str(importlib.resources.files("cifar_hpo")))
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / folder).is_dir():
        return checkout / folder
    return package / folder


SEARCH_SPACES = "cifar_hpo.search_spaces"  # the package search_space names live in


def _search_spaces_package() -> ModuleType:
    """Import ``cifar_hpo.search_spaces`` from `bundled` ("search_spaces"), once per process."""
    if SEARCH_SPACES in sys.modules:
        return sys.modules[SEARCH_SPACES]
    folder = bundled("search_spaces")
    spec = importlib.util.spec_from_file_location(SEARCH_SPACES, folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None or not (folder / "__init__.py").is_file():
        raise UserError(f"the bundled search spaces are missing ({folder}); reinstall cifar-hpo")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SEARCH_SPACES] = module
    spec.loader.exec_module(module)
    return module


def search_space_names() -> list[str]:
    """The bundled search spaces (modules of `bundled` ("search_spaces") not starting with ``_``)."""
    return sorted(p.stem for p in bundled("search_spaces").glob("*.py") if not p.stem.startswith("_"))


def load_search_space(name: str, *, where: str = "search space") -> Any:
    """Import ``cifar_hpo.search_spaces.<name>`` and check it has ``suggest(trial, recipe)``."""
    valid = search_space_names()
    if not name.isidentifier():
        raise UserError(f"{where} {name!r} is not a module name; valid: {', '.join(valid)}")
    _search_spaces_package()
    try:
        module = importlib.import_module(f"{SEARCH_SPACES}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{SEARCH_SPACES}.{name}":
            raise UserError(f"{where} {name!r} not found; valid: {', '.join(valid)}") from None
        raise UserError(f"{where} {name!r} cannot be imported: {e}") from None
    except Exception as e:
        raise UserError(f"{where} {name!r} cannot be imported ({type(e).__name__}: {e}); fix search_spaces/{name}.py") from None
    if not callable(getattr(module, "suggest", None)):
        raise UserError(f"{where} {name!r}: search_spaces/{name}.py must define suggest(trial, recipe) -> TrialParams")
    return module


def default_recipe(spec: StudySpec) -> TrialParams:
    """The study model's default recipe for the study's ``recipe`` kind (`models.default_params`).

    The search space searches around it (``suggest(trial, recipe)``) and
    ``retrain --default-params`` trains it. The study file's ``[arch]`` options
    replace the recipe's.
    """
    from cifar_hpo.models import default_params  # torch: listing and loading search spaces does not need it

    recipe = default_params(spec.model, spec.recipe)
    return recipe.replace(arch={**recipe.arch, **spec.arch}) if spec.arch else recipe


def suggest_params(spec: StudySpec, trial: optuna.trial.BaseTrial) -> TrialParams:
    """Run the study's search space on ``trial`` around its default recipe; check it returned TrialParams.

    Raises:
        TypeError: ``suggest`` returned something else than TrialParams.
        ValueError: it built another model than the study file names.
    """
    params = load_search_space(spec.search_space).suggest(trial, default_recipe(spec))
    if not isinstance(params, TrialParams):
        raise TypeError(f"search_spaces/{spec.search_space}.py suggest() returned {type(params).__name__}, not TrialParams")
    if params.model != spec.model:
        raise ValueError(f"search space {spec.search_space!r} built model {params.model!r}, the study file says {spec.model!r}")
    return params


class _RecipeTrial:
    """A stand-in for an Optuna trial that answers each ``suggest_*`` with the recipe's own value of that name.

    A name is a `TrialParams` field or an ``arch`` option of the recipe. What the recipe has no
    value for, or a value outside the suggested range or choices, is noted in ``problems``.
    """

    def __init__(self, recipe: TrialParams) -> None:
        self.recipe = recipe
        self.params: dict[str, Any] = {}
        self.problems: list[str] = []

    def _own(self, name: str, fallback: Any) -> Any:
        if name in self.recipe.arch:
            return self.recipe.arch[name]
        if name in TrialParams.__dataclass_fields__:
            return getattr(self.recipe, name)
        self.problems.append(f"the recipe has no value for the parameter {name!r}")
        return fallback

    def _number(self, name: str, low: float, high: float) -> Any:
        value = self._own(name, low)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            self.problems.append(f"{name} {value!r} is outside the space's range [{low:g}, {high:g}]")
            value = low
        self.params[name] = value
        return value

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        return float(self._number(name, low, high))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return int(self._number(name, low, high))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        choices = list(choices)
        value = self._own(name, choices[0])
        if value not in choices:
            self.problems.append(f"{name} {value!r} is not among the space's choices {choices}")
            value = choices[0]
        self.params[name] = value
        return value


def recipe_point(spec: StudySpec) -> tuple[dict[str, Any] | None, str]:
    """The search-space parameters that train exactly the study's recipe (`default_recipe`), or None and why not.

    Each parameter the search space suggests is answered with the recipe's value of the same name;
    the point counts only if the search space, replayed on it, gives back the recipe itself. The
    fast spaces search around their recipe and contain it; spaces that search other choices (the
    pretrained spaces fine-tune, the recipe trains from scratch) do not.
    """
    import optuna  # the search space replays through FixedTrial; listing spaces does not need optuna

    recipe = default_recipe(spec)
    module = load_search_space(spec.search_space)
    probe = _RecipeTrial(recipe)
    try:
        module.suggest(probe, recipe)
    except Exception as e:  # noqa: BLE001 - a stand-in value may not build valid TrialParams: the recipe is not in the space
        probe.problems.append(f"the search space refused the recipe's values ({type(e).__name__}: {e})")
    if probe.problems:
        return None, probe.problems[0]
    replayed = module.suggest(optuna.trial.FixedTrial(probe.params), recipe)
    if replayed != recipe:
        differ = [k for k, v in replayed.to_dict().items() if recipe.to_dict()[k] != v]
        return None, f"the space cannot express the recipe's {', '.join(differ)}"
    return probe.params, "the model's registry recipe"
