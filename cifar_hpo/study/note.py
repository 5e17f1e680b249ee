"""What optuna-dashboard shows about a study: its metric's name and a note in words.

    cifar-hpo run --study fast --trials 20     # names the study when it opens it
    cifar-hpo dashboard                        # -> "val_acc", and the note on the study's page

``run.open_study`` calls ``describe_study`` with one line. The metric is named
``val_acc`` (Optuna's metric names; the dashboard shows "Objective 0" without).
The note (optuna-dashboard's study note, Markdown) says what the study is: its
spec, its data split and its search space in words. It is written once, when the
study has no note: a note edited in the dashboard is the user's and is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

from cifar_hpo.storage import quiet_experimental
from cifar_hpo.study import pruning
from cifar_hpo.study.budget import duration_text
from cifar_hpo.study.search_space import default_recipe, load_search_space, recipe_point
from cifar_hpo.study.spec import StudySpec

METRIC = "val_acc"  # what each trial returns and reports per epoch: accuracy on the validation split (0..1)
MAX_PASSES = 8  # a search space is replayed once per choice of its widest categorical, up to this many times


@dataclass
class SpaceRecorder:
    """A stand-in for an Optuna trial that records every ``suggest_*`` call instead of sampling.

    Categorical choices rotate with ``rotation`` so that replays walk the branches of conditional spaces.
    """

    rotation: int = 0
    seen: dict[str, str] = field(default_factory=dict)
    widest: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        scale = "log scale" if log else (f"step {step:g}" if step else "uniform")
        self.seen[name] = f"real number from {low:g} to {high:g} ({scale})"
        self.params[name] = low
        return low

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        scale = ", log scale" if log else (f", step {step}" if step != 1 else "")
        self.seen[name] = f"integer from {low} to {high}{scale}"
        self.params[name] = low
        return low

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        choices = list(choices)
        self.seen[name] = "one of " + ", ".join(f"`{c}`" for c in choices)
        self.widest = max(self.widest, len(choices))
        self.params[name] = choices[self.rotation % len(choices)]
        return self.params[name]

    def __getattr__(self, name: str) -> Any:  # set_user_attr, report, ...: a search space only suggests, but be lenient
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


def search_space_words(spec: StudySpec) -> list[tuple[str, str, bool]]:
    """(parameter, range in words, conditional?) for every parameter the study's search space can suggest."""
    module = load_search_space(spec.search_space)
    recipe = default_recipe(spec)
    passes: list[dict[str, str]] = []
    rotation, widest = 0, 1
    while rotation < min(widest, MAX_PASSES):
        rec = SpaceRecorder(rotation=rotation)
        try:
            module.suggest(rec, recipe)
        except Exception:  # noqa: S110 - the recorder's stand-in values may not build valid TrialParams; what it saw counts
            pass
        passes.append(rec.seen)
        widest, rotation = max(widest, rec.widest), rotation + 1
    names: dict[str, str] = {}
    for p in passes:
        names.update(p)
    return [(n, words, not all(n in p for p in passes)) for n, words in names.items()]


def _sampler_words(spec: StudySpec) -> str:
    s = spec.sampler
    if s.kind == "tpe":
        return f"TPE ({'multivariate, ' if s.multivariate else ''}{s.n_startup_trials} random trials first)"
    return s.kind


def _metric_words(spec: StudySpec) -> str:
    """What a trial reports and returns; what its rungs compare only where that is not the plain accuracy."""
    rungs = pruning.rung_value_words(spec)
    return (f"accuracy on the validation split (fraction 0..1) after each epoch{f' ({rungs})' if rungs else ''}; "
            "the trial's value is its best epoch's. Maximized.")  # fmt: skip


def _budget_words(spec: StudySpec) -> str:
    """The budget, when the study was created with one (`cifar_hpo.study.budget`)."""
    if spec.budget_s is None:
        return ""
    return f" or a budget of {duration_text(spec.budget_s)} of device time over all trials and workers (whichever ends first)"


def _first_words(spec: StudySpec) -> str:
    """The study's first configuration: the model's registry recipe where the search space contains it, or why not."""
    try:
        point, why = recipe_point(spec)
    except Exception as e:  # a search space that does more than suggest: say so, never fail the run for a note
        return f"(the recipe could not be placed in the search space: {type(e).__name__})"
    if point is None:
        return f"no trial is enqueued for the model's registry recipe (`{spec.recipe}`): {why}"
    trains = ", trains to the end (never paused), so the study is never worse than it" if spec.pruner.kind == "promote" else ""
    return f"the model's registry recipe (`{spec.recipe}`), enqueued as the first trial{trains}"


def _paused_words(spec: StudySpec) -> str:
    """Where a paused trial's state shows, under pause and promote."""
    if spec.pruner.kind != "promote":
        return ""
    return ("\n\n**Paused trials** are RUNNING in Optuna's tables (Optuna has no paused state): each one's `paused` and "
            "`schedule` user attributes say where it paused and why (\"paused at epoch 4: rank 7 of 24, the top 6 go on\"); "
            "`cifar-hpo status --study NAME` lists them as paused. A stopped trial is PRUNED with its reason in `schedule`.")


def study_note(spec: StudySpec, split_hash: str, counts: tuple[int, int] | None = None) -> str:
    """The study's note in Markdown: what is measured, the spec, the data split and the search space in words."""
    d = spec.data
    try:
        space = search_space_words(spec)
        rows = "\n".join(f"| `{n}` | {w}{' (only for some choices above)' if cond else ''} |" for n, w, cond in space)
        space_text = f"| parameter | range |\n|---|---|\n{rows}"
    except Exception as e:  # a search space that does more than suggest: say so, never fail the run for a note
        space_text = f"(could not be described: {type(e).__name__}; see `search_spaces/{spec.search_space}.py`)"
    images = f": {counts[0]:,} training / {counts[1]:,} validation images" if counts else ""
    subset = f", stratified subset of {d.subset:,} training images" if d.subset else ""
    wanted = f"{spec.trials} finished trials wanted{_budget_words(spec)}"
    return f"""## {spec.name}: {spec.model}

{spec.description.strip()}

**Metric `{METRIC}`**: {_metric_words(spec)}
The test split is never used by a trial.

**Spec**: model `{spec.model}`, search space `{spec.search_space}` (`search_spaces/{spec.search_space}.py`), {spec.epochs} epochs
per trial, {wanted}, sampler {_sampler_words(spec)}, pruner {pruning.pruner_words(spec)}, seed {spec.seed}.

**First configuration**: {_first_words(spec)}.{_paused_words(spec)}

**Data split**: `{d.source}`{subset}; {100 * d.val_fraction:g} % of the training images held out for validation,
stratified, split seed {d.split_seed}{images}. Split hash `{split_hash}` (every trial records it).

**Search space**:

{space_text}

**Each trial's page**: its parameters, `{METRIC}` per epoch (intermediate values), its learning curve as an image artifact
(`trial-N-curve.png`; loss and accuracy per epoch, pruned trials too), and for the best three a checkpoint artifact.
User attributes hold images/s, peak memory, parameter count, device and library versions.
"""


def describe_study(study: optuna.Study, spec: StudySpec, split_hash: str, counts: tuple[int, int] | None = None) -> None:
    """Name the metric and write the study note (only when the study has none yet)."""
    with quiet_experimental():  # metric names are experimental in Optuna
        if study.metric_names != [METRIC]:
            study.set_metric_names([METRIC])
    try:
        import optuna_dashboard
    except ImportError:  # the dashboard is a dependency, but a study must never fail for a note
        return
    if not optuna_dashboard.get_note(study):
        optuna_dashboard.save_note(study, study_note(spec, split_hash, counts))
