"""A study: its file, its search space, its pruner, one trial, the workers that run trials, the final retraining.

- `spec`: ``studies/<name>.toml`` -> a validated `StudySpec` (unknown keys refused, one-line errors).
- `search_space`: the bundled ``search_spaces/`` modules and ``suggest(trial, recipe) -> TrialParams``.
- `pruning`: the one home of pruners: the registry, rungs, fidelities, their words for the dashboard note.
- `scheduling`: pause and promote (the default pruner): which trial goes on at a rung, which paused trial a
  worker resumes, when the paused ones stop; the same rule for the live workers and ``bench search``'s replay.
- `create`: create or check the study in its database; the sampler.
- `objective`: one trial: suggest -> build -> train -> report/prune -> its record and artifacts.
- `worker`: one worker's loop until the study has its finished trials, through database outages.
- `supervisor`: ``--workers N`` processes on one machine, restarted when killed.
- `note`: what optuna-dashboard shows about the study (metric name, the note in words).
- `retrain`: the best trial (or the default recipe) on train + validation, tested once -> final.pt.
"""
