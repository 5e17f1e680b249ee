"""The trial record: every key round-trips, reasons classify as written by every version, old trials read as None."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from cifar_hpo.commands.status import trial_rows
from cifar_hpo.storage import record
from cifar_hpo.storage.record import FailKind, TrialRecord
from cifar_hpo.study.objective import NonFiniteLoss, finished_count
from cifar_hpo.study.worker import _trial_line

PACKAGE = Path(__file__).resolve().parents[1] / "cifar_hpo"


def _study(tmp_path: Path) -> optuna.Study:
    # SQLite, not in-memory: values go through the JSON of the database as in a real study.
    return optuna.create_study(study_name="r", storage=f"sqlite:///{tmp_path}/r.db", direction="maximize")


def _stored(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


# ---------------------------------------------------------------- round trip


def test_every_field_round_trips_with_the_values_of_the_previous_version(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    params = {"model": "baseline_cnn", "lr": 0.05, "batch_size": 128}
    versions = {"torch": "2.5.0", "optuna": "4.1.0"}
    record.write_sampler_seed(trial, 7)
    record.write_start(trial, trial_params=params, seed=300_009, split_hash="abc123", device="cpu (x86_64, 2 cores)",
                       versions=versions)  # fmt: skip
    record.write_params_count(trial, 12345)
    record.write_resumed(trial, 2)
    record.write_result(trial, epochs_run=4, best_epoch=3, wall_s=12.34, images_per_s=1500.5, peak_mem_mb=256.0, status="ok")
    record.write_checkpoint(trial, "artifact-1")
    record.write_failure(trial, FailKind.ERROR, "ValueError: only to store a reason")
    study.tell(trial, 0.5)
    stored = _stored(study, trial.number)
    # The database holds exactly what the previous version wrote, key for key.
    assert stored.user_attrs == {
        "sampler_seed": 7, "trial_params": params, "seed": 300_009, "split_hash": "abc123", "device": "cpu (x86_64, 2 cores)",
        "versions": versions, "params_count": 12345, "resumed_from_epoch": 2, "images_per_s": 1500.5, "peak_mem_mb": 256.0,
        "status": "ok", "epochs_run": 4, "best_epoch": 3, "wall_s": 12.34, "checkpoint_artifact_id": "artifact-1",
        "fail_reason": "ValueError: only to store a reason",
    }  # fmt: skip
    # KEYS lists every key, and the writer writes no other; pause and promote adds four (next test).
    assert set(stored.user_attrs) == set(record.KEYS) - set(PROMOTION_KEYS)
    assert record.read(stored) == TrialRecord(
        trial_params=params, seed=300_009, sampler_seed=7, split_hash="abc123", device="cpu (x86_64, 2 cores)", versions=versions,
        params_count=12345, resumed_from_epoch=2, images_per_s=1500.5, peak_mem_mb=256.0, status="ok", epochs_run=4,
        best_epoch=3, wall_s=12.34, checkpoint_artifact_id="artifact-1", fail_reason="ValueError: only to store a reason",
    )  # fmt: skip


PROMOTION_KEYS = ("origin", "paused", "schedule", "active_since")


def test_the_pause_and_promote_keys_round_trip_and_a_retry_does_not_inherit_a_pause(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.enqueue_trial({}, user_attrs=record.origin_attrs(record.RECIPE))
    trial = study.ask()
    record.write_paused(trial, epoch=4, rank=7, of=24, keep=6, text="paused at epoch 4: rank 7 of 24, the top 6 go on", wall_s=12.345)
    stored = _stored(study, trial.number)
    rec = record.read(stored)
    assert rec.origin == "recipe" and rec.schedule == "paused at epoch 4: rank 7 of 24, the top 6 go on"
    assert rec.paused is not None and {k: rec.paused[k] for k in ("trial", "epoch", "rank", "of", "keep")} == {
        "trial": trial.number, "epoch": 4, "rank": 7, "of": 24, "keep": 6}  # fmt: skip
    assert rec.wall_s == 12.35 and rec.epochs_run == 4 and record.is_paused(stored)
    assert record.device_seconds(stored) == 12.35  # paused: its training so far, not the time since it started
    record.write_active_since(trial)
    assert set(_stored(study, trial.number).user_attrs) >= set(PROMOTION_KEYS)
    # A copy of the marker on another trial (a retry copies its original's user attributes) is no pause.
    other = optuna.trial.FrozenTrial(number=trial.number + 1, state=optuna.trial.TrialState.RUNNING, value=None,
                                     datetime_start=stored.datetime_start, datetime_complete=None, params={}, distributions={},
                                     user_attrs=dict(stored.user_attrs), system_attrs={}, intermediate_values={}, trial_id=99)  # fmt: skip
    assert not record.is_paused(other)


def test_a_pruned_result_writes_no_throughput_and_a_storage_and_id_can_be_written_to(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    record.write_result(trial, epochs_run=2, best_epoch=2, wall_s=1.5)
    st, tid = study._storage, trial._trial_id
    record.write_failure((st, tid), FailKind.STALE, "no heartbeat for 60s (its worker was killed, or lost the database); retried")
    study.tell(trial, state=TrialState.FAIL)
    stored = _stored(study, trial.number)
    assert set(stored.user_attrs) == {"epochs_run", "best_epoch", "wall_s", "fail_reason"}
    rec = record.read(stored)
    assert (rec.images_per_s, rec.peak_mem_mb, rec.status) == (None, None, None)
    assert rec.fail_kind is FailKind.STALE


def test_a_plain_optuna_trial_reads_as_a_record_of_nones(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"someone_elses": 1}))
    for t in study.get_trials():
        rec = record.read(t)
        assert rec == TrialRecord()
        assert all(getattr(rec, k) is None for k in record.KEYS)
        assert rec.fail_kind is None and not rec.fail_reason_cleared and rec.fail_note(missing="see log") == "see log"


def test_values_of_another_type_read_as_none_and_ints_as_floats() -> None:
    t = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={
        "seed": "7", "epochs_run": 3.5, "best_epoch": True, "trial_params": [1, 2], "device": 3, "wall_s": 12, "images_per_s": "fast",
    })  # fmt: skip
    rec = record.read(t)
    assert (rec.seed, rec.epochs_run, rec.best_epoch, rec.trial_params, rec.device, rec.images_per_s) == (None,) * 6
    assert rec.wall_s == 12.0 and isinstance(rec.wall_s, float)


def test_a_retry_clears_the_reason_it_copied(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    record.write_failure(trial, FailKind.STALE, "no heartbeat at all in 600s since it started; retried")  # as copied by the retry
    record.clear_failure(trial)
    study.tell(trial, 0.5)
    rec = record.read(_stored(study, trial.number))
    assert rec.fail_reason is None and rec.fail_kind is None and rec.fail_reason_cleared
    assert rec.fail_note(missing="") is None  # `status` shows it as "-", as before


# ---------------------------------------------------------------- fail reasons

# The texts as today's code writes them (storage/heartbeat.py, study/worker.py, study/objective.py).
TODAYS_REASONS = [
    ("stale: no heartbeat for 60s (its worker was killed, or lost the database); retried", FailKind.STALE),
    ("stale: no heartbeat at all in 600s since it started; retried", FailKind.STALE),
    ("stale: no heartbeat for 1s; retried", FailKind.STALE),  # tests/test_faults.py writes this one by hand
    ("surplus: the study already had enough finished or running trials", FailKind.SURPLUS),
    ("surplus: a second retry of the same trial, #3 is the retry", FailKind.SURPLUS),
    ("interrupted (Ctrl-C or SIGTERM); re-queued to resume from its last snapshot", FailKind.INTERRUPTED),
    ("NonFiniteLoss: non-finite training loss in epoch 3; lower lr or use fp32", FailKind.NONFINITE),
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB", FailKind.OUT_OF_MEMORY),
    ("ValueError: bug in a user's search space", FailKind.ERROR),
    ("UserError: model 'nosuch' is not registered", FailKind.ERROR),
    ("RuntimeError: MPS backend out of memory", FailKind.ERROR),  # not torch's OutOfMemoryError
]


@pytest.mark.parametrize("reason, kind", TODAYS_REASONS)
def test_todays_reasons_classify(reason: str, kind: FailKind) -> None:
    assert record.classify(reason) is kind
    t = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": reason})
    assert record.read(t).fail_kind is kind and record.read(t).fail_reason == reason


@pytest.mark.parametrize("reason", [None, ""])
def test_no_reason_is_no_kind(reason: str | None) -> None:
    assert record.classify(reason) is None


@pytest.mark.parametrize(
    "kind, detail, text",
    [
        (FailKind.STALE, "no heartbeat for 60s (its worker was killed, or lost the database); retried", TODAYS_REASONS[0][0]),
        (FailKind.STALE, "no heartbeat at all in 600s since it started; retried", TODAYS_REASONS[1][0]),
        (FailKind.SURPLUS, "the study already had enough finished or running trials", TODAYS_REASONS[3][0]),
        (FailKind.SURPLUS, "a second retry of the same trial, #3 is the retry", TODAYS_REASONS[4][0]),
        (FailKind.INTERRUPTED, "(Ctrl-C or SIGTERM); re-queued to resume from its last snapshot", TODAYS_REASONS[5][0]),
        (FailKind.NONFINITE, "non-finite training loss in epoch 3; lower lr or use fp32", TODAYS_REASONS[6][0]),
        (FailKind.ERROR, "ValueError: bug in a user's search space", TODAYS_REASONS[8][0]),
    ],
)
def test_new_reasons_are_written_in_todays_text(tmp_path: Path, kind: FailKind, detail: str, text: str) -> None:
    assert record.fail_reason_text(kind, detail) == text
    study = _study(tmp_path)
    trial = study.ask()
    assert record.write_failure(trial, kind, detail) == text
    assert _stored(study, trial.number).user_attrs["fail_reason"] == text


def test_an_exception_is_written_as_its_class_and_first_line(tmp_path: Path) -> None:
    cases = [
        (NonFiniteLoss("non-finite training loss in epoch 3; lower lr or use fp32"), TODAYS_REASONS[6][0], FailKind.NONFINITE),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
         "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", FailKind.OUT_OF_MEMORY),
        (ValueError("first line\nsecond line"), "ValueError: first line", FailKind.ERROR),
        (KeyError("k"), "KeyError: 'k'", FailKind.ERROR),
    ]  # fmt: skip
    study = _study(tmp_path)
    for e, text, kind in cases:
        assert record.exception_text(e) == text and record.classify(text) is kind
        trial = study.ask()
        assert record.write_exception(trial, e) == text
        study.tell(trial, state=TrialState.FAIL)
        assert record.read(_stored(study, trial.number)).fail_kind is kind
    assert len(record.exception_text(RuntimeError("x" * 2000))) == record.MAX_REASON_CHARS == 500


# ---------------------------------------------------------------- readers show what they showed before


def _old_note(t: optuna.trial.FrozenTrial) -> Any:
    return t.user_attrs.get("fail_reason", "")  # commands/status.py before the record


def _old_trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial) -> str:
    # study/worker.py's _trial_line before the record.
    done = finished_count(study)
    try:
        best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    if t.state == TrialState.COMPLETE:
        what = f"complete, val_acc {t.value:.4f}"
    elif t.state == TrialState.PRUNED:
        what = f"pruned after {t.user_attrs.get('epochs_run', '?')} epochs"
    else:
        what = f"FAILED: {t.user_attrs.get('fail_reason', 'see log')}"
    return f"trial #{t.number} {what}; {done} finished, {best}"


def test_status_and_the_trial_line_show_what_they_showed_before(tmp_path: Path) -> None:
    study = _study(tmp_path)
    shapes: list[tuple[TrialState, dict[str, Any]]] = [
        (TrialState.FAIL, {}),  # failed before reasons were recorded
        (TrialState.FAIL, {"fail_reason": "surplus: the study already had enough finished or running trials"}),
        (TrialState.FAIL, {"fail_reason": "ValueError: bug"}),
        (TrialState.FAIL, {"fail_reason": None}),
        (TrialState.PRUNED, {"epochs_run": 2}),
        (TrialState.PRUNED, {}),
        (TrialState.COMPLETE, {"epochs_run": 3, "fail_reason": None}),  # a retry that completed
        (TrialState.COMPLETE, {"epochs_run": 3}),
        (TrialState.WAITING, {"fail_reason": "stale: no heartbeat for 1s; retried"}),  # a retry, not yet taken
    ]
    for state, attrs in shapes:
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, value=value, user_attrs=attrs))
    trials = study.get_trials(deepcopy=False)
    assert [r["note"] for r in trial_rows(study)] == [_old_note(t) for t in trials]
    assert [_trial_line(study, t) for t in trials] == [_old_trial_line(study, t) for t in trials]


# ---------------------------------------------------------------- one writer, one reader


def test_no_other_module_writes_or_parses_a_trial_attribute() -> None:
    banned = [r"set_trial_user_attr\(", r"trial\.set_user_attr\(", r"[\"']fail_reason[\"']", r"startswith\([\"'](stale|surplus)",
              r"t\.user_attrs", r"trial\.user_attrs", r"last\.user_attrs"]  # fmt: skip
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "record.py" and path.parent.name == "storage":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in banned) and "study.user_attrs" not in line:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert not found, "trial attributes go through cifar_hpo.storage.record:\n" + "\n".join(found)


def test_the_record_lists_its_keys_once() -> None:
    names = [f.name for f in dataclasses.fields(TrialRecord)]
    assert list(record.KEYS) == [n for n in names if n != "fail_reason_cleared"] and len(set(record.KEYS)) == len(record.KEYS)
