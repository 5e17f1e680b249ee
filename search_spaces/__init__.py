"""Search spaces: one module per architecture family (installed as ``cifar_hpo.search_spaces``).

Each module exposes ``suggest(trial, recipe) -> TrialParams``: plain code, so
conditional choices stay readable. ``recipe`` is the study model's default
recipe for the study file's ``recipe`` kind (`cifar_hpo.spec.default_recipe`,
from the registry in `cifar_hpo.models`); a space may search around it (fast)
or ignore it. Without search (``retrain --default-params``, ``cifar-hpo train``)
that recipe is trained as it is: a search space has no defaults of its own.
``suggest`` only calls ``trial.suggest_*``, so it works with a live Trial, a
FrozenTrial and a FixedTrial alike: the best trial is replayed by passing its
params to ``optuna.trial.FixedTrial``.
"""
