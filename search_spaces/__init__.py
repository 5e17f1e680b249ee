"""Search spaces: one module per architecture family.

Each module exposes ``suggest(trial) -> TrialParams`` (plain code, so
conditional choices stay readable) and ``defaults() -> TrialParams`` (the
recipe used without search, e.g. the baseline). ``suggest`` only calls
``trial.suggest_*``, so it works with a live Trial, a FrozenTrial and a
FixedTrial alike: the best trial is replayed by passing its params to
``optuna.trial.FixedTrial``.
"""
