"""Rung fidelities (wsd schedule, cooldown probes, EMA) and the study report's pruning check."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from cifar_hpo import models
from cifar_hpo.report import data as report_data
from cifar_hpo.report import figures as report_figures
from cifar_hpo.study import pruning as pruners
from cifar_hpo.study.spec import PrunerSpec, load_spec
from cifar_hpo.training import lr_factor, rung_acc, train
from cifar_hpo.training.optim import WSD_DECAY_FRAC
from tests.test_train import SMALL, colour_data


def test_wsd_is_flat_until_the_final_decay() -> None:
    total = 100
    lrs = [lr_factor("wsd", s, total, 0.1) for s in range(total)]
    assert lrs[5] < 1.0 and lrs[10] == 1.0  # warmup, then stable
    stable_end = int(total * (1 - WSD_DECAY_FRAC))
    assert all(v == 1.0 for v in lrs[10:stable_end])
    assert lrs[stable_end + 1] < 1.0 and 0 < lrs[-1] < 0.1  # linear decay, never a step at 0
    assert all(a >= b for a, b in zip(lrs[stable_end:], lrs[stable_end + 1 :], strict=False))


def _run(params, probe_epochs=(), ema_horizon=None, epochs=3):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = models.build(params, 3)
    return train(model, colour_data(), params, epochs=epochs, seed=1, probe_epochs=probe_epochs, ema_horizon=ema_horizon), model


def test_probes_measure_a_cooldown_without_changing_the_run() -> None:
    params = SMALL.replace(schedule="wsd")
    plain, m1 = _run(params)
    probed, m2 = _run(params, probe_epochs=(1, 2, 3))
    # The run continues from the saved weights, optimizer and random state: same history, same weights.
    assert [e.val_acc for e in probed.epochs] == [e.val_acc for e in plain.epochs]
    assert [e.train_loss for e in probed.epochs] == [e.train_loss for e in plain.epochs]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    # A probe at epochs 1 and 2, none at the last epoch (the run's own decay ends there).
    assert [e.probe_acc is not None for e in probed.epochs] == [True, True, False]
    assert [e.probe_steps for e in probed.epochs][:2] == [max(1, round(0.2 * 7)), max(1, round(0.2 * 14))]
    assert rung_acc(probed.epochs[0]) == probed.epochs[0].probe_acc
    assert rung_acc(plain.epochs[0]) == plain.epochs[0].val_acc


def test_ema_accuracy_is_recorded_and_reported() -> None:
    history, _ = _run(SMALL, ema_horizon=0.5)
    assert all(e.ema_acc is not None and 0.0 <= e.ema_acc <= 1.0 for e in history.epochs)
    assert rung_acc(history.epochs[1]) == history.epochs[1].ema_acc


def test_fidelity_settings_follow_the_study_file() -> None:
    spec = load_spec("fast")
    probe = spec.replace(pruner=PrunerSpec(kind="successive_halving", min_resource=1, reduction_factor=3, fidelity="probe"))
    rungs = pruners.rung_epochs("successive_halving", 1, 3, spec.epochs)
    assert pruners.probe_epochs(probe) == [e for e in rungs if pruners.probes_at(e, spec.epochs)] == [3]
    assert pruners.trial_params(probe, SMALL).schedule == "wsd"
    plain = spec.replace(pruner=PrunerSpec(fidelity="plain"))
    assert pruners.probe_epochs(plain) == [] and pruners.trial_params(plain, SMALL) is SMALL
    ema = PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="ema")
    assert pruners.ema_horizon(spec.replace(pruner=ema)) == pruners.EMA_HORIZON_EPOCHS


def test_bad_fidelity_in_a_study_file_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cifar_hpo.errors import UserError

    path = tmp_path / "s.toml"
    path.write_text('model = "fast_cnn"\nsearch_space = "fast"\nepochs = 2\ntrials = 2\n[pruner]\nfidelity = "magic"\n')
    with pytest.raises(UserError, match="pruner.fidelity"):
        load_spec(str(path))


def _study(curves: list[tuple[list[float], bool]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="s")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, (values, complete) in enumerate(curves):
        inter = {e + 1: v for e, v in enumerate(values)}
        state = TrialState.COMPLETE if complete else TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(state=state, params={"x": i / 10}, distributions=dist,
                                                  intermediate_values=inter, value=max(values) if complete else None))  # fmt: skip
    return study


def test_study_pruning_data_ranks_rungs_from_completed_trials() -> None:
    # Epoch 1 ranks the completed trials backwards (curves cross); epoch 2 ranks them right.
    study = _study([([0.5, 0.6, 0.7], True), ([0.4, 0.7, 0.8], True), ([0.3, 0.8, 0.9], True), ([0.1], False)])
    data = report_data.study_pruning_data(study)
    assert data["spearman"][1] == pytest.approx(-1.0) and data["spearman"][2] == pytest.approx(1.0)
    assert data["pruned_at"] == [1] and data["complete"] == 3 and data["pruned"] == 1
    assert [p["epochs"] for p in data["points"]] == [3, 6, 9, 10]
    assert [p["best"] for p in data["points"]] == [0.7, 0.8, 0.9, 0.9]
    line = report_data.pruning_line(data)
    assert "epoch 1 -1.00" in line and "rank trials poorly" in line


def test_pruning_line_with_too_few_trials() -> None:
    assert "too few completed trials" in report_data.pruning_line(report_data.study_pruning_data(_study([([0.5, 0.6], True)])))


def test_draw_pruning_writes_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = report_data.study_pruning_data(_study([([0.5, 0.6], True), ([0.2], False), ([0.4, 0.7], True)]))
    path = report_figures.draw_pruning(data, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def _rung_study(keep: int) -> optuna.Study:
    pruner = pruners.pruner_for("rung_top_k", min_resource=1, reduction_factor=3, epochs=8, keep=keep)
    return optuna.create_study(direction="maximize", pruner=pruner)


def _trial_stops_at(study: optuna.Study, curve: list[float]) -> int:
    trial = study.ask()
    for epoch, value in enumerate(curve, 1):
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return epoch
    study.tell(trial, curve[-1])
    return len(curve)


def test_rung_top_k_keeps_only_the_k_best_at_each_rung() -> None:
    study = _rung_study(keep=1)
    assert _trial_stops_at(study, [0.5] * 8) == 8  # the first trial always continues
    assert _trial_stops_at(study, [0.4] * 8) == 1  # worse at the first rung (epoch 1)
    assert _trial_stops_at(study, [0.6, 0.6, 0.45] + [0.9] * 5) == 3  # best at epoch 1, not at rung 3
    assert _trial_stops_at(study, [0.7] * 8) == 8  # best at both rungs: never pruned
    assert _trial_stops_at(study, [0.5] + [0.99] * 7) == 1  # only rung epochs count; epoch 1 decides
    study2 = _rung_study(keep=2)
    assert _trial_stops_at(study2, [0.5] * 8) == 8
    assert _trial_stops_at(study2, [0.4] * 8) == 8  # second best so far: kept
    assert _trial_stops_at(study2, [0.3] * 8) == 1  # two did better
    assert pruners.rung_epochs("rung_top_k", 1, 3, 8) == [1, 3]


def test_probe_epochs_skip_the_first_rung() -> None:
    spec = load_spec("fast").replace(epochs=8)
    spec = spec.replace(pruner=PrunerSpec(kind="rung_top_k", min_resource=1, reduction_factor=3, fidelity="probe"))
    assert pruners.probe_epochs(spec) == [3]  # epoch 1 compares the plain accuracy (PROBE_FROM_EPOCH)
    long = spec.replace(epochs=10, pruner=PrunerSpec(kind="successive_halving", min_resource=1, reduction_factor=3, fidelity="probe"))
    assert pruners.probe_epochs(long) == [3]  # rung 9 is inside the trial's own final decay (epochs 9-10)


def test_an_unpruned_study_keeps_the_search_spaces_schedule() -> None:
    spec = load_spec("fast")
    assert spec.pruner.fidelity == "plain" and pruners.trial_params(spec, SMALL) is SMALL  # the shipped default
    spec = spec.replace(pruner=PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="probe"))
    assert pruners.trial_params(spec, SMALL).schedule == "wsd"
    none = spec.replace(pruner=PrunerSpec(kind="none", fidelity="probe"))
    assert pruners.trial_params(none, SMALL).schedule == SMALL.schedule and pruners.probe_epochs(none) == []


def test_the_ema_fidelity_evaluates_the_average_only_at_the_rungs() -> None:
    spec = load_spec("fast").replace(epochs=10, pruner=PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="ema"))
    assert pruners.ema_epochs(spec) == [1, 4]
    assert pruners.ema_epochs(spec.replace(pruner=PrunerSpec(kind="none", fidelity="ema"))) == []
    model = models.build(SMALL, 3)
    history = train(model, colour_data(), SMALL, epochs=3, seed=1, ema_horizon=0.5, ema_epochs=[2])
    assert [e.ema_acc is not None for e in history.epochs] == [False, True, False]


def test_an_extra_evaluation_costs_the_studys_validation_share() -> None:
    # 9:1 split: 1 validation image per 9 training images, a forward pass a third of a step.
    assert pruners.eval_cost(0.1) == pytest.approx(1 / 27)


def test_the_note_names_a_rung_top_k_pruner() -> None:
    from cifar_hpo.study.note import study_note

    spec = load_spec("fast").replace(pruner=PrunerSpec(kind="rung_top_k", min_resource=1, reduction_factor=4, keep=2))
    note = study_note(spec, "hash")
    assert "pruner none" not in note  # it prunes
    assert "pruner rung top-2 on epochs (at least 1 epoch(s) per trial" in note and "epochs 1, 4" in note


def test_the_note_mentions_probes_only_where_probes_run() -> None:
    from cifar_hpo.study.note import study_note

    plain = load_spec("fast")  # the shipped default: plain fidelity, no probe ever runs
    assert plain.pruner.fidelity == "plain"
    note = study_note(plain, "hash")
    assert "probe" not in note
    assert "(fraction 0..1) after each epoch; the trial's value is its best epoch's. Maximized." in note
    probe = plain.replace(pruner=PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="probe"))
    assert pruners.probe_epochs(probe) == [4]
    words = "after each epoch (at probe epochs, the accuracy of the short cooldown probe the pruner ranks on); the trial's"
    assert words in study_note(probe, "hash")
    # rungs 1 only: before PROBE_FROM_EPOCH
    no_probe = plain.replace(epochs=3, pruner=PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="probe"))
    assert pruners.probe_epochs(no_probe) == [] and "probe" not in study_note(no_probe, "hash")


def test_the_note_says_what_an_ema_rung_compares() -> None:
    from cifar_hpo.study.note import study_note

    note = study_note(load_spec("fast").replace(pruner=PrunerSpec(kind="successive_halving", reduction_factor=4, fidelity="ema")), "hash")
    assert "after each epoch (at rung epochs, the accuracy of the average (EMA) of the weights the pruner ranks on)" in note
    assert "probe" not in note


def test_a_pruner_registered_in_pruning_alone_is_a_study_files_pruner(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Adding a pruner is one entry in pruning.PRUNERS: the study file validates, the study
    # (create, worker) builds it, its rungs are its own and the dashboard note names it.
    from cifar_hpo.study.note import study_note

    built: list[pruners.PrunerArgs] = []

    def build(a: pruners.PrunerArgs) -> optuna.pruners.BasePruner:
        built.append(a)
        return optuna.pruners.ThresholdPruner(lower=0.5)

    kind = pruners.PrunerKind(build=build, rungs=lambda min_resource, rf, epochs: [epochs - 1],
                              words=lambda a: f"threshold 0.5 (keep {a.keep})")  # fmt: skip
    monkeypatch.setitem(pruners.PRUNERS, "threshold", kind)
    path = tmp_path / "t.toml"
    path.write_text('model = "fast_cnn"\nsearch_space = "fast"\nepochs = 3\ntrials = 2\n[pruner]\nkind = "threshold"\nkeep = 3\n')
    spec = load_spec(str(path))
    assert isinstance(pruners.make_pruner(spec), optuna.pruners.ThresholdPruner)
    assert built == [pruners.PrunerArgs(min_resource=1, reduction_factor=3, epochs=3, n_startup_trials=5, n_warmup_steps=1, keep=3)]
    assert pruners.rung_epochs("threshold", 1, 4, 3) == [2]
    assert "pruner threshold 0.5 (keep 3), seed 0" in study_note(spec, "hash")
    monkeypatch.delitem(pruners.PRUNERS, "threshold")
    from cifar_hpo.errors import UserError

    with pytest.raises(UserError, match="pruner.kind must be one of promote, hyperband, successive_halving, rung_top_k, median, none"):
        load_spec(str(path))


def test_every_pruner_kind_builds_and_has_words() -> None:
    spec = load_spec("fast")
    for name in pruners.PRUNERS:
        kind_spec = spec.replace(pruner=PrunerSpec(kind=name))
        assert isinstance(pruners.make_pruner(kind_spec), optuna.pruners.BasePruner), name
        assert pruners.pruner_words(kind_spec), name
    with pytest.raises(ValueError, match="unknown pruner kind 'magic'"):
        pruners.rung_epochs("magic", 1, 4, 10)


def test_pruner_for_defaults_are_the_study_files() -> None:
    # The replay's pruner_for must build what a study file of the same kind builds.
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(pruners.pruner_for).parameters.items() if v.default is not v.empty}
    assert defaults == {k: getattr(PrunerSpec(), k) for k in ("n_startup_trials", "n_warmup_steps", "keep")}


def test_bench_prunings_pruner_choices_are_registered_kinds() -> None:
    import argparse

    from cifar_hpo import cli

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]  # type: ignore[no-any-return]

    bench_pruning = sub(sub(cli.build_parser(), "bench"), "pruning")
    choices = next(a.choices for a in bench_pruning._actions if a.dest == "pruner")
    assert choices and set(choices) <= set(pruners.PRUNERS)
