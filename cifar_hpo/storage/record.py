"""One trial's record: the Optuna user attributes a trial stores, its one writer and its one reader.

    record.write_start(trial, trial_params=..., seed=..., split_hash=..., device=..., versions=...)
    record.write_failure(trial, FailKind.SURPLUS, "the study already had enough finished or running trials")
    rec = record.read(frozen_trial)      # a TrialRecord; None where a key is not stored
    rec.fail_kind is FailKind.STALE      # how the trial failed, read from its stored reason text

`TrialRecord` lists every key (its field names are the attribute keys, with types and units).
The keys, the values and the ``fail_reason`` texts are exactly those of the previous version,
so databases written by either version read the same. The first word of ``fail_reason`` is a
protocol between modules: a heartbeat marks "stale" trials (re-queued here in the storage layer),
the worker "surplus" ones (not counted as failures); `classify` reads it, `fail_reason_text` writes it.

It lives in the storage layer because `heartbeat` writes the stale reason, and storage imports
no layer above it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
import sqlalchemy

from cifar_hpo.storage import optuna_compat

# A trial to write to: a live trial (its cached copy is kept up to date), or a storage and a trial id
# (the heartbeat storage marks other workers' trials it has no Trial object for).
TrialRef = optuna.Trial | tuple[optuna.storages.BaseStorage, int]


class FailKind(enum.Enum):
    """Why a trial failed, as its stored ``fail_reason`` text says."""

    STALE = "stale"  # its worker stopped sending heartbeats (killed, or cut off from the database); retried
    SURPLUS = "surplus"  # started beyond the study's trial count, or a second retry of one trial; ran nothing
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM; re-queued to resume from its last snapshot
    NONFINITE = "nonfinite"  # the training loss became NaN or infinite (study.objective.NonFiniteLoss)
    OUT_OF_MEMORY = "out_of_memory"  # torch.cuda.OutOfMemoryError
    # A file or the database could not be written (no space left, read-only); re-queued, and the run stopped.
    # New in this version: older ones read the reason as ERROR.
    NOT_SAVED = "not_saved"
    ERROR = "error"  # any other exception


# The first word of each kind's reason text and what separates it from the detail, as written by the
# previous version: "stale: no heartbeat for 60s ...", "interrupted (Ctrl-C or SIGTERM); ...",
# "NonFiniteLoss: non-finite training loss ..." (an exception's reason starts with its class name).
# Readers compared only the first word ("stale", "surplus"), so `classify` does too.
_FIRST_WORD: dict[FailKind, tuple[str, str]] = {
    FailKind.STALE: ("stale", ": "),
    FailKind.SURPLUS: ("surplus", ": "),
    FailKind.INTERRUPTED: ("interrupted", " "),
    FailKind.NONFINITE: ("NonFiniteLoss", ": "),
    FailKind.OUT_OF_MEMORY: ("OutOfMemoryError", ": "),
    FailKind.NOT_SAVED: ("not saved", ": "),  # "not saved: no space left on /data (writing ...); re-queued"
}


MAX_REASON_CHARS = 500  # an exception's reason: its first line, cut to this many characters


@dataclass(frozen=True)
class TrialRecord:
    """What a trial stored, each field under the user attribute of the same name; None where it is not stored.

    Trials of a plain Optuna study, of older databases, or failed before a key was written read
    with those fields None. Written in this order: the start fields when the trial begins, the
    result fields once training is over (also for pruned trials), ``fail_reason`` when it fails.
    """

    # Written when the trial starts.
    trial_params: dict[str, Any] | None = None  # TrialParams.to_dict(): what the trial trained with
    seed: int | None = None  # torch seed of the training (a retry trains with its original's)
    sampler_seed: int | None = None  # seed of the worker's sampler that proposed the trial
    split_hash: str | None = None  # the train/validation split trained on (as the study's split_hash)
    device: str | None = None  # device name: the GPU model, or "cpu (<machine>, <n> cores)"
    versions: dict[str, str] | None = None  # library name -> version
    params_count: int | None = None  # model parameters (count)
    resumed_from_epoch: int | None = None  # a retry: epoch of the snapshot it resumed from
    origin: str | None = None  # "recipe": the model's registry recipe, the study's first configuration (never paused)
    # Pause and promote (study.scheduling). While paused (the trial is RUNNING in Optuna's tables, its
    # snapshot kept): where and why, {"trial", "epoch", "rank", "of", "keep", "at", "id"}; removed when a worker claims it.
    paused: dict[str, Any] | None = None
    schedule: str | None = None  # the scheduler's last word on the trial: "paused at epoch 1: rank 3 of 5, ..."
    active_since: str | None = None  # a resumed trial: when its current stretch of training began (ISO 8601, UTC)
    # Written once training is over. images_per_s, peak_mem_mb, status: not for pruned trials.
    images_per_s: float | None = None  # training images per second, mean over epochs
    peak_mem_mb: float | None = None  # MiB, max over epochs (CUDA: allocated; CPU: process max RSS)
    status: str | None = None  # training outcome: "ok", "nonfinite" or "stopped"
    epochs_run: int | None = None  # epochs trained (pruned: epochs reported)
    best_epoch: int | None = None  # epoch of the best validation accuracy (0: none)
    wall_s: float | None = None  # seconds from start to result, 2 decimals
    checkpoint_artifact_id: str | None = None  # artifact of the best checkpoint (only among the best few)
    # Written when the trial fails; a retry stores it as null (it copied its failed original's).
    fail_reason: str | None = None  # one line; its first word is the FailKind (see `classify`)
    # Not a key: whether fail_reason is stored as null (cleared by a retry) rather than absent.
    fail_reason_cleared: bool = False

    @property
    def fail_kind(self) -> FailKind | None:
        """How the trial failed (`classify` of its reason); None when it stored no reason."""
        return classify(self.fail_reason)

    def fail_note(self, missing: str) -> str | None:
        """The reason as `status` and the worker's trial line show it.

        Args:
            missing: shown when no reason is stored at all.

        Returns:
            The reason; ``missing`` when none is stored; None when a retry cleared its original's.
        """
        if self.fail_reason is not None:
            return self.fail_reason
        return None if self.fail_reason_cleared else missing


# Every user attribute key a trial writes: the record's fields but its one derived flag.
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialRecord) if f.name != "fail_reason_cleared")


# ---------------------------------------------------------------- classifying and composing reasons


def classify(reason: str | None) -> FailKind | None:
    """The kind of failure a stored ``fail_reason`` text names; None for no reason (None or empty).

    Reads the texts of every version: "stale: ...", "surplus: ...", "interrupted (Ctrl-C or SIGTERM); ...",
    "NonFiniteLoss: ...", "OutOfMemoryError: ...", anything else is `FailKind.ERROR`.
    """
    if not reason:
        return None
    for kind, (word, _) in _FIRST_WORD.items():
        if reason.startswith(word):
            return kind
    return FailKind.ERROR


def fail_reason_text(kind: FailKind, detail: str) -> str:
    """The ``fail_reason`` text for a failure of ``kind``: its first word, then ``detail``.

    ``FailKind.ERROR`` has no first word: ``detail`` is the whole text (see `exception_text`).
    """
    if kind is FailKind.ERROR:
        return detail
    word, sep = _FIRST_WORD[kind]
    return f"{word}{sep}{detail}"


def exception_text(e: BaseException) -> str:
    """The ``fail_reason`` of a trial that raised ``e``: "<class name>: <message>", first line, cut short."""
    return f"{type(e).__name__}: {e}".strip().splitlines()[0][:MAX_REASON_CHARS]


# ---------------------------------------------------------------- the writer


def _set(trial: TrialRef, key: str, value: Any) -> None:
    if isinstance(trial, tuple):
        st, trial_id = trial
        st.set_trial_user_attr(trial_id, key, value)
    else:
        trial.set_user_attr(key, value)


def write_start(trial: TrialRef, *, trial_params: Mapping[str, Any], seed: int, split_hash: str, device: str,
                versions: Mapping[str, str]) -> None:  # fmt: skip
    """What the trial trains: its parameters, seed, split, device and library versions."""
    _set(trial, "trial_params", dict(trial_params))
    _set(trial, "seed", int(seed))
    _set(trial, "split_hash", str(split_hash))
    _set(trial, "device", str(device))
    _set(trial, "versions", dict(versions))


def write_sampler_seed(trial: TrialRef, seed: int) -> None:
    """The seed of the sampler (of the worker) that proposed the trial."""
    _set(trial, "sampler_seed", int(seed))


def write_params_count(trial: TrialRef, count: int) -> None:
    """The number of model parameters, once the model is built."""
    _set(trial, "params_count", int(count))


def clear_failure(trial: TrialRef) -> None:
    """Store ``fail_reason`` as null: a retry copied its failed original's reason, but has not failed."""
    _set(trial, "fail_reason", None)


def clear_inherited(trial: TrialRef) -> None:
    """A retry starts: store as null what it copied from its failed original and is not its own.

    Its reason (`clear_failure`), the original's pause marker, schedule note and training time: a
    retry trains afresh from its original's snapshot and is no paused trial.
    """
    clear_failure(trial)
    for key in ("paused", "schedule", "active_since", "wall_s"):
        _set(trial, key, None)


def write_resumed(trial: TrialRef, epoch: int) -> None:
    """A retry resumed from its original's snapshot taken after ``epoch``."""
    _set(trial, "resumed_from_epoch", int(epoch))


def write_result(trial: TrialRef, *, epochs_run: int, best_epoch: int, wall_s: float, images_per_s: float | None = None,
                 peak_mem_mb: float | None = None, status: str | None = None) -> None:  # fmt: skip
    """The outcome of training; the optional fields (not known for a pruned trial) are written only when given."""
    if images_per_s is not None:
        _set(trial, "images_per_s", float(images_per_s))
    if peak_mem_mb is not None:
        _set(trial, "peak_mem_mb", float(peak_mem_mb))
    if status is not None:
        _set(trial, "status", str(status))
    _set(trial, "epochs_run", int(epochs_run))
    _set(trial, "best_epoch", int(best_epoch))
    _set(trial, "wall_s", float(wall_s))


RECIPE = "recipe"  # `TrialRecord.origin` of the study's first configuration, the model's registry recipe


def origin_attrs(origin: str) -> dict[str, str]:
    """The user attributes of an enqueued trial saying where its configuration came from (`RECIPE`: the registry recipe).

    Given to ``Study.enqueue_trial``: a waiting trial carries them from its creation.
    """
    return {"origin": str(origin)}


def write_schedule(trial: TrialRef, text: str) -> None:
    """The scheduler's last word on the trial, for `status` and the dashboard ("promoted at epoch 4: ...")."""
    _set(trial, "schedule", str(text))


def write_paused(trial: optuna.Trial, *, epoch: int, rank: int, of: int, keep: int, text: str, wall_s: float) -> None:
    """The trial paused after ``epoch`` (its snapshot is saved): its standing there and its training time so far.

    The ``paused`` attribute is the marker `claim_paused` takes away; each pause writes a new one
    (with its own ``id``), so a worker can claim only the pause it decided on.
    """
    _set(trial, "wall_s", round(float(wall_s), 2))
    _set(trial, "epochs_run", int(epoch))
    _set(trial, "schedule", str(text))
    at = datetime.now(UTC).isoformat(timespec="seconds")
    # The trial's number: a marker counts only on the trial that wrote it, not on a retry that copied it.
    marker = {"trial": int(trial.number), "epoch": int(epoch), "rank": int(rank), "of": int(of), "keep": int(keep), "at": at,
              "id": uuid.uuid4().hex[:12]}  # fmt: skip
    _set(trial, "paused", marker)


def clear_pause(trial: TrialRef) -> None:
    """Store the pause marker as null: the trial goes on (a replay's in-memory study; live workers `claim_paused`)."""
    _set(trial, "paused", None)


def is_paused(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` is paused: RUNNING with the marker it wrote itself (a retry's copy of its original's is not one)."""
    marker = read(trial).paused
    return trial.state == optuna.trial.TrialState.RUNNING and marker is not None and marker.get("trial") == trial.number


def claim_paused(st: optuna.storages.RDBStorage, trial_id: int, paused: Mapping[str, Any]) -> bool:
    """Take the paused trial ``trial_id`` for this process: delete its ``paused`` marker if it is still ``paused``.

    The DELETE is conditional on the stored marker, so of several workers trying at once exactly one
    gets True (SQLite serializes writes; PostgreSQL's row lock makes the second DELETE find nothing).
    A marker written by a later pause of the same trial has another ``id`` and is not taken.
    """
    table = optuna_compat.USER_ATTR_TABLE
    with st.engine.begin() as con:
        row = con.execute(sqlalchemy.text(f"SELECT value_json FROM {table} WHERE trial_id = :t AND key = 'paused'"),
                          {"t": trial_id}).first()  # fmt: skip
        if row is None or _dict(json.loads(row[0])) != dict(paused):
            return False
        gone = con.execute(sqlalchemy.text(f"DELETE FROM {table} WHERE trial_id = :t AND key = 'paused' AND value_json = :v"),
                           {"t": trial_id, "v": row[0]})  # fmt: skip
        return gone.rowcount == 1


def write_active_since(trial: TrialRef) -> None:
    """A resumed trial's current stretch of training begins now (its device time is ``wall_s`` plus this stretch)."""
    _set(trial, "active_since", datetime.now(UTC).isoformat(timespec="seconds"))


def write_checkpoint(trial: TrialRef, artifact_id: str) -> None:
    """The artifact id of the trial's best checkpoint."""
    _set(trial, "checkpoint_artifact_id", str(artifact_id))


def write_failure(trial: TrialRef, kind: FailKind, detail: str) -> str:
    """Store why the trial failed (`fail_reason_text`), before it is marked FAIL; returns the text.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: the trial has finished meanwhile.
    """
    text = fail_reason_text(kind, detail)
    _set(trial, "fail_reason", text)
    return text


def write_exception(trial: TrialRef, e: BaseException) -> str:
    """Store that the trial failed by raising ``e`` (`exception_text`); returns the text."""
    text = exception_text(e)
    _set(trial, "fail_reason", text)
    return text


# ---------------------------------------------------------------- the reader


def read(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    """The record ``trial`` stored; a key that is absent or holds a value of another type reads as None."""
    attrs = trial.user_attrs
    reason = attrs.get("fail_reason")
    return TrialRecord(
        trial_params=_dict(attrs.get("trial_params")),
        seed=_int(attrs.get("seed")),
        sampler_seed=_int(attrs.get("sampler_seed")),
        split_hash=_str(attrs.get("split_hash")),
        device=_str(attrs.get("device")),
        versions=_dict(attrs.get("versions")),
        params_count=_int(attrs.get("params_count")),
        resumed_from_epoch=_int(attrs.get("resumed_from_epoch")),
        origin=_str(attrs.get("origin")),
        paused=_dict(attrs.get("paused")),
        schedule=_str(attrs.get("schedule")),
        active_since=_str(attrs.get("active_since")),
        images_per_s=_float(attrs.get("images_per_s")),
        peak_mem_mb=_float(attrs.get("peak_mem_mb")),
        status=_str(attrs.get("status")),
        epochs_run=_int(attrs.get("epochs_run")),
        best_epoch=_int(attrs.get("best_epoch")),
        wall_s=_float(attrs.get("wall_s")),
        checkpoint_artifact_id=_str(attrs.get("checkpoint_artifact_id")),
        fail_reason=None if reason is None else str(reason),
        fail_reason_cleared="fail_reason" in attrs and reason is None,
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    # JSON keeps 3.0 a float, but a value written as an int by hand (or by another tool) is still a number.
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, dict) else None


def device_seconds(trial: optuna.trial.FrozenTrial) -> float:
    """Seconds of device time the trial used: its recorded training time, else start to end (or to now, while it runs).

    ``wall_s`` counts this trial's own training (a retry's, not its killed original's); a paused
    trial's holds the stretches before its pause, and a resumed one adds its current stretch
    (``active_since`` to its end, or to now). A trial that recorded none (failed, killed, still
    running) is charged from its start to its end: for a trial failed as stale that includes the
    heartbeat grace period, a small overcount. A trial that never started (WAITING) used nothing.
    """
    rec = read(trial)
    if trial.state == optuna.trial.TrialState.WAITING:  # a re-queued retry carries no time of its own
        return 0.0
    if rec.wall_s is not None and (is_paused(trial) or trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        return rec.wall_s
    if rec.wall_s is not None and rec.active_since:
        try:
            since = datetime.fromisoformat(rec.active_since)
        except ValueError:
            return rec.wall_s
        end = trial.datetime_complete.astimezone(UTC) if trial.datetime_complete else datetime.now(UTC)
        return rec.wall_s + max(0.0, (end - since).total_seconds())
    if rec.wall_s is not None:
        return rec.wall_s
    start = trial.datetime_start
    if start is None:
        return 0.0
    # Optuna 4 stores naive local times, Optuna 5 aware UTC ones: compare each with its own kind.
    end = trial.datetime_complete or datetime.now(start.tzinfo)
    return max(0.0, (end - start).total_seconds())
