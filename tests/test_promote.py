"""Pause and promote, live: real studies on tiny synthetic data, in this process and as worker processes.

- a paused and resumed trial trains exactly as an uninterrupted one (weights, values, checkpoint);
- a planted best configuration that starts slowly is found, where successive halving loses it;
- two worker processes, one SIGKILLed while it resumes a paused trial: every configuration is
  accounted for, none trained twice at once, none lost (SQLite and PostgreSQL);
- a run stopped by SIGTERM and started again continues the same schedule;
- the recipe is the first configuration, trains to the end, and the sampler sees paused trials.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import make_image_folder, study_toml
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.storage import checkpoint, heartbeat, optuna_compat, record
from cifar_hpo.study import create, scheduling, worker
from cifar_hpo.study.objective import TrialPaused
from cifar_hpo.study.spec import StudySpec, load_spec

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, as the workers do
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
FAST_FAULTS = {"CIFAR_HPO_HEARTBEAT": "1", "CIFAR_HPO_GRACE": "3", "CIFAR_HPO_SNAPSHOT_S": "0"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c", "d"), n_train=16, n_test=4)


def _spec(tmp_path: Path, folder: Path, *, epochs: int, trials: int, pruner: str = "promote", name: str = "p") -> StudySpec:
    f = tmp_path / f"{name}.toml"
    f.write_text(study_toml(name=name, epochs=epochs, trials=trials, pruner=pruner))
    return load_spec(str(f)).with_overrides(data=str(folder))


def _run_in_process(spec: StudySpec, tmp_path: Path, tag: str) -> tuple[optuna.Study, str, Path]:
    """Create the study and run one worker on it here (sampler seed 0: the same configurations in every run)."""
    url = f"sqlite:///{tmp_path}/{tag}.db"
    results = tmp_path / f"results-{tag}"
    data = worker.load_data(spec, device="cpu", cache_dir=tmp_path / "cache")
    create.open_study(spec, url, data.split_hash)
    worker.work(spec, url, results, data, seed=0)
    return optuna.load_study(study_name=spec.name, storage=url), url, results


def _checkpoint_state(study: optuna.Study, url: str, results: Path, number: int) -> dict[str, Any]:
    t = next(t for t in study.get_trials() if t.number == number)
    artifact = record.read(t).checkpoint_artifact_id
    assert artifact is not None, f"trial {number} kept no checkpoint"
    path = results.parent / f"ckpt-{uuid.uuid4().hex[:8]}.pt"
    optuna.artifacts.download_artifact(artifact_store=storage.artifact_store(url, results), artifact_id=artifact, file_path=str(path))
    state = checkpoint.load(path)["model_state"]
    path.unlink()
    return state  # type: ignore[no-any-return]


def test_a_paused_and_resumed_trial_trains_exactly_as_an_uninterrupted_one(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 0 is paused after epochs 1 and 2 and promoted each time (it is the only one), then completes."""
    plain = _spec(tmp_path, folder, epochs=4, trials=1, pruner="none", name="plain")
    unpaused, url0, res0 = _run_in_process(plain, tmp_path, "plain")

    real = scheduling.decide
    paused_at: list[int] = []

    def pause_once_at_1_and_2(study: optuna.Study, rule: scheduling.Rule, key: int, epoch: int, target: int) -> scheduling.Decision:
        if epoch in (1, 2) and epoch not in paused_at:
            paused_at.append(epoch)
            return scheduling.Decision(False, scheduling.Standing(epoch, 1, 1, 0))
        return real(study, rule, key, epoch, target)

    monkeypatch.setattr(scheduling, "decide", pause_once_at_1_and_2)
    promoted = dataclasses.replace(plain, name="paused", pruner=dataclasses.replace(plain.pruner, kind="promote"))
    paused, url1, res1 = _run_in_process(promoted, tmp_path, "paused")

    assert paused_at == [1, 2]
    a, b = unpaused.trials[0], paused.trials[0]
    assert b.state == TrialState.COMPLETE and "promoted at epoch 2" in (record.read(b).schedule or "")
    assert b.params == a.params and b.intermediate_values == a.intermediate_values and b.value == a.value
    assert record.read(b).epochs_run == 4 and record.read(b).best_epoch == record.read(a).best_epoch
    wa, wb = _checkpoint_state(unpaused, url0, res0, 0), _checkpoint_state(paused, url1, res1, 0)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any((res1 / "paused").rglob("last.pt")), "the finished trial's snapshot is left behind"


# ---------------------------------------------------------------- planted curves through the real worker loop


def _planted_objective(curves: dict[int, list[float]], log: list[tuple[int, int]]) -> Any:
    """An objective that reports planted accuracies (by trial number) and pauses at rungs as the real one does."""

    def objective(trial: optuna.Trial, ctx: Any) -> float:
        frozen = trial.storage.get_trial(optuna_compat.trial_id(trial))
        lineage = heartbeat.lineage(frozen)
        trial.suggest_float("x", 0, 1)
        curve = curves[lineage]
        done = max(frozen.intermediate_values, default=0)
        rule = scheduling.rule_of(ctx.spec)
        for epoch in range(done + 1, len(curve) + 1):
            log.append((lineage, epoch))
            trial.report(curve[epoch - 1], epoch)
            d = scheduling.decide(trial.study, rule, lineage, epoch, ctx.target_trials) if rule is not None else None
            if d is not None and not d.go_on and d.standing is not None:
                s = d.standing
                record.write_paused(trial, epoch=epoch, rank=s.rank, of=s.n, keep=s.keep, text=f"paused at epoch {epoch}", wall_s=0.0)
                raise TrialPaused(f"trial #{trial.number} paused at epoch {epoch}")
        return max(curve)

    return objective


def test_a_slow_starter_is_found_where_successive_halving_loses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve configurations; the third starts below the first two and ends best (successive halving stops it at epoch 1)."""
    curves = {k: [0.30 + 0.01 * e for e in range(10)] for k in range(12)}
    curves[0] = [0.50] + [0.51] * 9
    curves[1] = [0.45] + [0.46] * 9
    curves[2] = [0.40, 0.50, 0.60, 0.70, 0.75, 0.78, 0.80, 0.82, 0.84, 0.85]
    f = tmp_path / "s.toml"
    f.write_text(study_toml(name="s", epochs=10, trials=12, pruner="promote").replace("reduction_factor = 2", "reduction_factor = 4"))
    spec = load_spec(str(f))
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    log: list[tuple[int, int]] = []
    monkeypatch.setattr(worker, "objective", _planted_objective(curves, log))
    optuna.create_study(study_name="s", storage=storage.open_storage(url), direction="maximize")
    worker.work(spec, url, tmp_path / "results", None, st=storage.open_storage(url), seed=0)

    study = optuna.load_study(study_name="s", storage=url)
    assert study.best_trial.number == 2 and study.best_value == 0.85
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 12
    assert len(log) == len(set(log)), "an epoch was trained twice"
    # Exactly what the replay of the same curves does (the live loop and the replay run one rule).
    replay = scheduling.simulate(scheduling.rule_of(spec), [curves[k] for k in range(12)])  # type: ignore[arg-type]
    assert len(log) == replay.epochs and {t.number for t in study.trials if t.state == TrialState.COMPLETE} == set(replay.completed)
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert (record.read(t).schedule or "").startswith(f"stopped at epoch {max(t.intermediate_values)}: rank ")

    from cifar_hpo.bench import search  # the successive-halving replay of the same curves

    sh = search.replay(search.Rule("sh", "successive_halving", reduction_factor=4), [{"val_acc": curves[k]} for k in range(12)], 10, 0)
    assert sh.best < 0.85, "the planted case does not show what successive halving loses"


# ---------------------------------------------------------------- worker processes


def _run_cmd(tmp_path: Path, folder: Path, study: Path, url: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(study), "--data", str(folder), "--workers", str(workers),
            "--device", "cpu", "--storage", url, "--results", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip


def _promote_study_file(tmp_path: Path, *, trials: int, epochs: int) -> Path:
    name = f"p{uuid.uuid4().hex[:10]}"
    f = tmp_path / f"{name}.toml"
    f.write_text(study_toml(name=name, epochs=epochs, trials=trials, pruner="promote"))
    return f


def _drop_pg_study(name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=storage.open_storage(PG, heartbeat=False))
    except KeyError:
        pass


def _accounted(trials: list[optuna.trial.FrozenTrial], target: int) -> None:
    """Every configuration finished (complete, or stopped with its reason), nothing left running, paused or waiting."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == target, [(t.number, t.state.name) for t in trials]
    assert len({heartbeat.lineage(t) for t in finished}) == target
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in finished:
        if t.state == TrialState.PRUNED:
            assert (record.read(t).schedule or "").startswith("stopped at epoch"), record.read(t)
    # One lineage never trains in two places at once: a retry starts after its original was failed.
    for t in trials:
        if t.state == TrialState.FAIL and t.datetime_complete is not None:
            for r in trials:
                if r.number > t.number and heartbeat.lineage(r) == heartbeat.lineage(t) and r.datetime_start is not None:
                    assert r.datetime_start >= t.datetime_complete


@pytest.fixture(scope="module")
def slower_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 training images: a resumed trial trains long enough (half a second an epoch) to be killed in the middle."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=("a", "b", "c", "d"), n_train=150, n_test=4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_worker_killed_while_it_resumes_loses_nothing(tmp_path: Path, slower_folder: Path, backend: str) -> None:
    folder = slower_folder
    study = _promote_study_file(tmp_path, trials=10, epochs=6)
    name = study.stem
    url = PG if backend == "postgres" else f"sqlite:///{tmp_path}/db.sqlite3"
    env = {**os.environ, **FAST_FAULTS, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_run_cmd(tmp_path, folder, study, url, workers=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)  # fmt: skip
    pids: dict[str, int] = {}
    lines: list[str] = []
    killed: tuple[str, int, int] | None = None  # worker, trial, epoch it was paused at
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"\[(w\d)\] worker pid (\d+)", line):
                pids[m.group(1)] = int(m.group(2))
            m = re.match(r"\[(w\d)\] trial #(\d+) promoted at epoch (\d+)", line)
            if m and killed is None and m.group(1) in pids:
                os.kill(pids[m.group(1)], signal.SIGKILL)  # mid-resume: it has just claimed the paused trial
                killed = (m.group(1), int(m.group(2)), int(m.group(3)))
        assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
        assert killed is not None, "no trial was ever promoted:\n" + "".join(lines[-30:])
        trials = optuna.load_study(study_name=name, storage=storage.open_storage(url, heartbeat=False)).trials
        _accounted(trials, 10)
        # Killed while it trained after its promotion: failed as stale, and its retry went on from the snapshot.
        victim = next(t for t in trials if t.number == killed[1])
        assert victim.state == TrialState.FAIL, (victim.state, record.read(victim))
        assert record.read(victim).fail_kind is record.FailKind.STALE
        retries = [t for t in trials if heartbeat.lineage(t) == victim.number and t.number != victim.number]
        # From its pause's snapshot, or a later one it wrote before it died (a kill between a report and its snapshot
        # leaves the snapshot one epoch behind: that epoch is trained again, not reported again).
        assert retries and killed[2] <= (record.read(retries[0]).resumed_from_epoch or 0) <= max(victim.intermediate_values)
        # No paused trial was taken by two workers: each pause is promoted at most once.
        promotions = [re.sub(r"^\[w\d\] ", "", ln) for ln in lines if "promoted at epoch" in ln]
        assert len(promotions) == len(set(promotions)), promotions
    finally:
        if proc.poll() is None:
            proc.kill()
        if backend == "postgres":
            _drop_pg_study(name)


@pytest.mark.slow
def test_a_rerun_after_sigterm_continues_the_same_schedule(tmp_path: Path, folder: Path) -> None:
    study = _promote_study_file(tmp_path, trials=8, epochs=4)
    name = study.stem
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    env = {**os.environ, **FAST_FAULTS, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_run_cmd(tmp_path, folder, study, url, workers=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    seen: set[str] = set()
    for line in proc.stdout:
        if m := re.match(r"trial #(\d+) paused at epoch", line):
            seen.add(m.group(1))
        if len(seen) >= 3:  # three trials paused (one may have been resumed since): stop the run there
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    proc.wait(timeout=120)
    before = {t.number: record.read(t).paused for t in optuna.load_study(study_name=name, storage=url).trials
              if record.is_paused(t)}  # fmt: skip
    assert len(before) >= 2
    rerun = subprocess.run(_run_cmd(tmp_path, folder, study, url, workers=1), capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    trials = optuna.load_study(study_name=name, storage=url).trials
    _accounted(trials, 8)
    by_number = {t.number: t for t in trials}
    for number, marker in before.items():  # each trial paused before SIGTERM went on as itself, from where it paused
        t = by_number[number]
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert marker is not None and max(t.intermediate_values) >= marker["epoch"]
    assert "paused at epoch" in rerun.stdout or "promoted at epoch" in rerun.stdout or "stopped at epoch" in rerun.stdout


# ---------------------------------------------------------------- the recipe first, the sampler's view


def test_the_recipe_is_the_first_trial_of_a_new_study_once(tmp_path: Path) -> None:
    spec = load_spec("fast_light")
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = create.open_study(spec, url, "hash")
    create.open_study(spec, url, "hash")  # a second run of the same study
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and record.read(waiting[0]).origin == record.RECIPE
    trial = study.ask()  # what the first worker takes
    assert trial.number == 0
    from cifar_hpo.study.search_space import default_recipe, suggest_params

    assert suggest_params(spec, trial) == default_recipe(spec)
    baseline = load_spec("baseline")
    other = create.open_study(baseline, f"sqlite:///{tmp_path}/other.db", "hash")
    assert other.get_trials() == []  # the baseline space cannot express its recipe (constant lr): nothing enqueued


def test_the_sampler_sees_a_paused_trial_as_pruned_at_its_rung(tmp_path: Path) -> None:
    study = optuna.create_study(storage=storage.open_storage(f"sqlite:///{tmp_path}/db.sqlite3"), direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(0.4, 1)
    record.write_paused(trial, epoch=1, rank=2, of=4, keep=1, text="paused at epoch 1", wall_s=1.0)
    seen: list[list[optuna.trial.FrozenTrial]] = []

    class Spy(optuna.samplers.RandomSampler):
        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            seen.append(study._get_trials(deepcopy=False, states=(TrialState.PRUNED,), use_cache=True))
            return super().sample_independent(study, trial, name, dist)

    study.sampler = create.PausedAsPruned(Spy(seed=0))
    study.ask().suggest_float("x", 0, 1)
    assert [(t.number, t.state, t.last_step) for t in seen[0]] == [(0, TrialState.PRUNED, 1)]
    assert study.trials[0].state == TrialState.RUNNING  # only the sampler's view changed


def test_status_lists_paused_trials_and_why(tmp_path: Path) -> None:
    from cifar_hpo.commands.status import study_rows, trial_rows

    spec = load_spec("fast_light")
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = create.open_study(spec, url, "hash")
    recipe = study.ask()  # the enqueued recipe, running
    paused = study.ask()
    paused.suggest_float("lr", 0.0375, 3.75, log=True)
    paused.report(0.31, 1)
    record.write_paused(paused, epoch=1, rank=7, of=24, keep=8, text="paused at epoch 1: rank 7 of 24, the top 8 go on", wall_s=3.0)
    rows = {r["trial"]: r for r in trial_rows(study)}
    assert rows[paused.number]["state"] == "paused" and rows[paused.number]["note"] == "paused at epoch 1: rank 7 of 24, the top 8 go on"
    assert rows[paused.number]["seconds"] == 3.0  # its training so far, not the time since it began
    assert rows[recipe.number]["state"] == "running" and rows[recipe.number]["note"] == "the model's recipe"
    (row,) = study_rows(storage.open_existing(url))
    assert (row["running"], row["paused"]) == (1, 1)


def test_paused_trials_go_on_when_the_study_file_no_longer_pauses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without it, a study whose file switched from promote to another pruner waited for ever on its paused trials."""
    f = tmp_path / "s.toml"
    f.write_text(study_toml(name="s", epochs=4, trials=2, pruner="none"))
    spec = load_spec(str(f))
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = optuna.create_study(study_name="s", storage=storage.open_storage(url), direction="maximize")
    for value in (0.3, 0.4):  # two trials paused at epoch 1 under the earlier file
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(value, 1)
        record.write_paused(trial, epoch=1, rank=1, of=2, keep=0, text="paused at epoch 1", wall_s=1.0)
    log: list[tuple[int, int]] = []
    monkeypatch.setattr(worker, "objective", _planted_objective({0: [0.3, 0.5, 0.6, 0.7], 1: [0.4, 0.5, 0.6, 0.8]}, log))
    monkeypatch.setattr(worker, "POLL_S", 0.01)  # a wait would show as a timeout, not as a hang
    worker.work(spec, url, tmp_path / "results", None, st=storage.open_storage(url), seed=0, timeout=30)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE] and [t.value for t in trials] == [0.7, 0.8]
    assert sorted(log) == [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    assert all(record.read(t).schedule == "resumed: the study's pruner no longer pauses trials" for t in trials)


def test_a_paused_trial_beyond_a_lowered_target_is_failed_and_its_snapshot_deleted(tmp_path: Path) -> None:
    """A study paused with --trials 20 and run again with --trials 1: the paused trial is surplus, and nothing
    will resume it, so its snapshot goes with it (it used to stay on disk)."""
    from cifar_hpo.study.objective import trial_folder

    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = create.open_study(load_spec("fast_light"), url, "hash")
    results = tmp_path / "results"
    study.tell(study.ask(), 0.5)  # the recipe, complete: one finished trial
    paused = study.ask()
    paused.suggest_float("lr", 0.0375, 3.75, log=True)
    paused.report(0.31, 1)
    record.write_paused(paused, epoch=1, rank=2, of=2, keep=0, text="paused at epoch 1: rank 2 of 2", wall_s=1.0)
    kept = trial_folder(results, study, paused.number)
    kept.mkdir(parents=True)
    (kept / "last.pt").write_bytes(b"snapshot")
    other = trial_folder(results, study, 0)  # another configuration's folder stays
    other.mkdir(parents=True)
    lines: list[str] = []
    assert not worker._fail_spares(study, worker._progress(study), 1, lines.append, results)
    assert study.get_trials()[paused.number].state == TrialState.FAIL
    assert not kept.exists() and other.is_dir()
    assert lines == [f"trial #{paused.number} not run: the study already had enough finished or running trials"]


def test_the_time_left_is_shared_by_the_trials_training_now(tmp_path: Path) -> None:
    """Two workers each printed the whole study's time left at their own pace (twice the truth); a paused
    trial trains nothing and shares nothing."""
    import time
    import types

    from cifar_hpo.study.objective import time_left

    spec = load_spec("fast_light")
    study = create.open_study(spec, f"sqlite:///{tmp_path}/db.sqlite3", "hash")
    first = study.ask()  # the recipe, training
    first.report(0.4, 1)
    epoch = types.SimpleNamespace(epoch=1, seconds=10.0)

    def left() -> float:
        return time_left(spec, 20, study.get_trials(deepcopy=False), 0, epoch, 0.0, [])

    alone = left()
    assert alone == 10.0 * scheduling.epochs_left(scheduling.rule_of(spec), scheduling.ladder(study.get_trials()), 20)
    second = study.ask()
    second.suggest_float("lr", 0.0375, 3.75, log=True)
    assert left() == pytest.approx(alone / 2)
    second.report(0.2, 1)
    record.write_paused(second, epoch=1, rank=2, of=2, keep=0, text="paused at epoch 1: rank 2 of 2", wall_s=1.0)
    assert left() == pytest.approx(alone - 10.0)  # one worker again; the paused trial's first epoch is done
    other = dataclasses.replace(spec, pruner=dataclasses.replace(spec.pruner, kind="none"))
    plain = time_left(other, 20, study.get_trials(deepcopy=False), 0, epoch, time.time() - 10.0, [])
    assert 10.0 * 9 + 100.0 * 19 - 5 < plain < 10.0 * 9 + 100.0 * 19 + 5  # one trial training: its 9 epochs, 19 trials of 100 s
