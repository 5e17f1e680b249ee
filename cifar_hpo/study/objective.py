"""The Optuna adapter: suggest -> build -> train -> report/prune -> attrs, artifacts.

One ``Context`` is built per worker process (data already on the device);
``objective(trial, ctx)`` runs one trial. A trial that raises is recorded as
FAIL with its reason in the user attribute ``fail_reason`` (`storage.record`); a non-finite loss
fails the trial (never a NaN score). A trial interrupted by Ctrl-C or SIGTERM
is failed and re-queued with the same parameters, and its retry (like the
retry of a trial whose worker was killed) resumes from the last snapshot. A
write the disk refuses (no space left, read-only) fails and re-queues the trial
the same way and stops the run (`TrialNotSaved`).

A trial's files (its resumable snapshot) live in ``results/<study>/<uid>/trials/<n>/``
(`trial_folder`): keyed by the study's identity in its database, so that studies of
the same name in other databases, sharing one results folder, never touch them.
The previous version's ``results/<study>/trials/<n>/`` is still resumed from.
"""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from cifar_hpo import models, plots, storage, training
from cifar_hpo.device import device_name, library_versions
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint, optuna_compat, record
from cifar_hpo.storage.refused import WriteRefused, refusal, refusing
from cifar_hpo.study import pruning, scheduling
from cifar_hpo.study.spec import StudySpec

KEEP_BEST = 3  # a completed trial writes its checkpoint when it is among this many best so far

def _snapshot_every_s() -> float:
    """Seconds of training between resumable snapshots within a trial."""
    return float(os.environ.get("CIFAR_HPO_SNAPSHOT_S", "60"))


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN or infinite loss."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (preemption) turned into an interrupt, so the trial is saved and marked."""


class TrialPaused(BaseException):
    """The trial paused at a rung (pause and promote, `scheduling`): its snapshot is saved, and it stays RUNNING.

    A BaseException, so that Optuna records nothing (the trial is not finished: a worker resumes it
    when it ranks among its rung's best, or stops it when the study ends); the message is the reason.
    """


class TrialNotSaved(BaseException):
    """A write the disk refused (no space left, read-only) stopped the trial, and stops the run.

    Neither the trial's fault nor a lost connection, and retrying does not help until the user frees
    space: the trial is failed with the reason and re-queued (its snapshot kept, so its retry resumes),
    or, where the database itself refuses, left RUNNING to be failed as stale and retried by the
    next run. A BaseException, so that Optuna records nothing more (it could not, or it would count
    a failure), and the worker's loop stops with the refusal's one line (`refused.refusals_as_one_line`).
    """


@dataclass
class Context:
    """What every trial of one worker process shares."""

    spec: StudySpec
    data: Any  # data.DeviceData, on the training device
    results: Path  # results folder; trial files go to results/<study>/<uid>/trials/<n>/ (`trial_folder`)
    store: optuna.artifacts.FileSystemArtifactStore
    target_trials: int
    log: Callable[[str], None] = print
    snapshot_every_s: float = field(default_factory=_snapshot_every_s)
    started: float = field(default_factory=time.time)
    trial_seconds: list[float] = field(default_factory=list)
    # Calls a database write once training is over; ``run.work`` retries it while the database is
    # away, so a lost connection does not throw a trained trial's result away.
    until_written: Callable[[Callable[[], Any]], Any] = field(default=lambda write: write())
    # The number of the paused trial this worker has claimed and now resumes (pause and promote), else None.
    resuming: int | None = None


def study_uid(study: optuna.Study) -> str:
    """The study's identity in its database (its ``uid`` user attribute, set by `create.open_study`).

    Tells it from another study of the same name (another database, or a deleted one). A study
    made elsewhere without one is named by its name and id in its database.
    """
    uid = study.user_attrs.get("uid")
    return str(uid) if uid else f"{study.study_name}#{optuna_compat.study_id(study)}"


def study_folder(results: Path, study: optuna.Study) -> Path:
    """``results/<study>/<uid>/``: the files of this study alone (`study_uid`, made safe as one folder name)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", study_uid(study))[:64]
    return results / study.study_name / name


def trial_folder(results: Path, study: optuna.Study, lineage: int) -> Path:
    """Where trial ``lineage`` (a retry: its first trial's number) keeps its resumable snapshot ``last.pt``."""
    return study_folder(results, study) / "trials" / str(lineage)


def legacy_trial_folder(results: Path, name: str, lineage: int) -> Path:
    """``results/<study>/trials/<n>/``: the previous version's trial folder, shared by every study named ``name``."""
    return results / name / "trials" / str(lineage)


def finished_count(study: optuna.Study) -> int:
    """Complete + pruned trials: what ``--trials`` counts."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def objective(trial: optuna.Trial, ctx: Context) -> float:
    """Train one trial; return its best validation accuracy."""

    root = storage.retried_trial_number(trial)
    lineage = trial.number if root is None else root
    folder = trial_folder(ctx.results, trial.study, lineage)
    owned = [folder]  # deleted once the trial is over (with the previous version's folder it resumed from)
    last = folder / "last.pt"
    seed = ctx.spec.seed * 100_003 + lineage  # a retry trains with its original's seed
    started = time.time()
    n_done = finished_count(trial.study)
    model: torch.nn.Module | None = None
    try:
        params = pruning.trained_params(ctx.spec, trial)  # the fidelity may set the schedule; retrain replays the same
        record.write_start(trial, trial_params=params.to_dict(), seed=seed, split_hash=ctx.data.split_hash,
                           device=device_name(ctx.data.device), versions=library_versions())  # fmt: skip
        torch.manual_seed(seed)
        model = models.build(params, ctx.data.num_classes).to(ctx.data.device)
        record.write_params_count(trial, sum(p.numel() for p in model.parameters()))
        identity = snapshot_identity(trial, ctx, lineage)
        # A retry inherits its original's reports, a resumed (promoted) trial has its own; training resumes from the
        # snapshot, or re-trains those epochs without one (they are not reported again, nor decided again at rungs).
        frozen = trial.storage.get_trial(optuna_compat.trial_id(trial))
        reported = set(frozen.intermediate_values)
        promoted = ctx.resuming == trial.number  # a paused trial this worker resumed: its training time goes on adding up
        resume, legacy = _snapshot_to_resume(folder, legacy_trial_folder(ctx.results, ctx.spec.name, lineage), identity, ctx,
                                             retry=root is not None or promoted)  # fmt: skip
        owned += [legacy] if legacy is not None else []
        if root is not None and not promoted:
            record.clear_inherited(trial)  # copied from the failed original: its failure, its pause, its training time
        wall_before = (record.read(frozen).wall_s or 0.0) if promoted else 0.0
        if promoted:
            record.write_active_since(trial)
        if resume is not None:
            if not promoted:
                record.write_resumed(trial, int(resume["epoch"]))
            ctx.log(f"trial {trial.number}: resuming trial {lineage} from epoch {int(resume['epoch'])}")
        elif reported:
            ctx.log(f"trial {trial.number}: no snapshot of trial {lineage} here; training its {max(reported)} epoch(s) again")
        best = _best_from(resume)
        last_snapshot = [time.time()]
        rule = scheduling.rule_of(ctx.spec)

        def on_epoch(result: training.EpochResult, snapshot: Callable[[], dict]) -> None:
            if not math.isfinite(result.val_loss):
                return  # train() ends this run with status "nonfinite" itself
            fresh = result.epoch not in reported
            if fresh:
                trial.report(training.rung_acc(result), result.epoch)
            if result.val_acc > best["acc"] and model is not None:
                best.update(acc=result.val_acc, epoch=result.epoch,
                            state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})  # fmt: skip
            decision = scheduling.decide(trial.study, rule, lineage, result.epoch, ctx.target_trials) \
                if rule is not None and fresh else None  # fmt: skip
            if decision is not None and not decision.go_on and decision.standing is not None:
                checkpoint.save(_snapshot_with_best(snapshot(), best, identity), last)
                text = f"paused at epoch {result.epoch}: {decision.standing.words()}"
                s = decision.standing
                record.write_paused(trial, epoch=result.epoch, rank=s.rank, of=s.n, keep=s.keep, text=text,
                                    wall_s=wall_before + time.time() - started)  # fmt: skip
                _progress(ctx, trial, n_done, result, started)
                raise TrialPaused(f"trial #{trial.number} {text}")
            if result.epoch < ctx.spec.epochs and time.time() - last_snapshot[0] >= ctx.snapshot_every_s:
                checkpoint.save(_snapshot_with_best(snapshot(), best, identity), last)
                last_snapshot[0] = time.time()
            _progress(ctx, trial, n_done, result, started)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {result.epoch} at val_acc {result.val_acc:.4f}")

        try:
            history = training.train(model, ctx.data, params, epochs=ctx.spec.epochs, seed=seed, on_epoch=on_epoch, resume=resume,
                                  probe_epochs=pruning.probe_epochs(ctx.spec), ema_horizon=pruning.ema_horizon(ctx.spec),
                                  ema_epochs=pruning.ema_epochs(ctx.spec))
        except optuna.TrialPruned:
            ctx.until_written(lambda: _record(trial, ctx, wall_before + time.time() - started, None, best))
            _remove(owned)
            raise
        ctx.until_written(lambda: _record(trial, ctx, wall_before + time.time() - started, history, best))
        if history.status == "nonfinite":
            raise NonFiniteLoss(f"non-finite training loss in epoch {len(history.epochs) + 1}; lower lr or use fp32")
        value = float(history.best_val_acc)
        ctx.until_written(lambda: _keep_checkpoint(trial, ctx, params, best, value))
        _remove(owned)
        return value
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        record.write_failure(trial, record.FailKind.INTERRUPTED, "(Ctrl-C or SIGTERM); re-queued to resume from its last snapshot")
        storage.requeue_interrupted(trial.study, trial.number)
        raise
    except Exception as e:
        if (refused := refusal(e)) is not None:  # a full or read-only disk: not the trial's fault
            _not_saved(trial, ctx, refused)
            raise TrialNotSaved(str(refused)) from e
        reason = record.write_exception(trial, e)
        ctx.log(f"trial {trial.number} failed: {reason}")
        _remove(owned)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            model = None
            _free_device_memory()
        raise
    finally:
        ctx.trial_seconds.append(time.time() - started)
        model = None  # drop the reference before freeing device memory
        if ctx.data.device.type == "cuda":
            _free_device_memory()


def _snapshot_with_best(snap: dict[str, Any], best: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """A resumable snapshot with what it belongs to and the trial's best epoch so far.

    The best epoch's weights are stored only when they are not the snapshot's own (the best epoch
    is usually the last one), so a paused trial's file holds one copy of the weights in most cases.
    """
    current = best["epoch"] == snap["epoch"]
    return {**snap, "identity": identity, "best": {"acc": best["acc"], "epoch": best["epoch"], "state": None if current else best["state"]}}


def _best_from(resume: dict[str, Any] | None) -> dict[str, Any]:
    """The best epoch so far of a run that resumes from ``resume`` (its weights, for the checkpoint artifact)."""
    kept = (resume or {}).get("best")
    if not isinstance(kept, dict) or not isinstance(kept.get("epoch"), int) or not kept["epoch"]:
        return {"acc": -1.0, "state": None, "epoch": 0}
    state = kept.get("state") if kept.get("state") is not None else resume.get("model_state")  # type: ignore[union-attr]
    # On the CPU, as the best weights of a run that never paused (the snapshot was loaded onto the training device).
    cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()} if isinstance(state, dict) else None
    return {"acc": float(kept["acc"]), "epoch": int(kept["epoch"]), "state": cpu}


def snapshot_identity(trial: optuna.Trial, ctx: Context, lineage: int) -> dict[str, Any]:
    """What a resumable snapshot belongs to: this study (not an earlier one of the same name), trial and split."""
    return {"study": ctx.spec.name, "study_uid": study_uid(trial.study), "trial": lineage, "split_hash": ctx.data.split_hash}


def _snapshot_to_resume(folder: Path, legacy: Path, identity: dict[str, Any], ctx: Context, *,
                        retry: bool) -> tuple[dict[str, Any] | None, Path | None]:  # fmt: skip
    """The snapshot a trial resumes from (None: train from the start), and the previous version's folder it came from.

    The trial's own folder (`trial_folder`) holds this study's files only: what is there and not
    resumed (a new trial's leftover, an unreadable snapshot) is deleted. The previous version's
    folder (`legacy_trial_folder`) is shared by every study of this name in the results folder: its
    snapshot is resumed when it names this trial, deleted when it names nobody (unreadable, or older
    than snapshots that name their study), and left alone when it names another study, whose own
    run resumes it.
    """
    resume = _own_snapshot(folder / "last.pt", identity, ctx) if retry else None
    if resume is None and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    if not (legacy / "last.pt").is_file():
        return resume, None  # none, or only a temp file its writer may still be writing
    old = _load_snapshot(legacy / "last.pt", ctx)
    owner = old.get("identity") if old is not None else None
    if owner is not None and owner != identity:
        return resume, None  # another study's
    if retry and resume is None and owner == identity:
        return old, legacy
    shutil.rmtree(legacy, ignore_errors=True)  # nobody's, or this trial's own but not needed
    return resume, None


def _load_snapshot(last: Path, ctx: Context) -> dict[str, Any] | None:
    """The snapshot at ``last``; None when there is none or it cannot be loaded (said in the log)."""
    if not last.is_file():
        return None
    try:
        snap = checkpoint.load(last, map_location=ctx.data.device)
    except UserError as e:
        ctx.log(f"ignoring snapshot {last}: {e}")
        return None
    return snap if isinstance(snap, dict) else None


def _own_snapshot(last: Path, identity: dict[str, Any], ctx: Context) -> dict[str, Any] | None:
    """The snapshot at ``last`` if it names exactly ``identity``, else None (the caller deletes it).

    Only the params used to be compared, so a leftover ``trials/<n>/last.pt`` of an earlier study
    (another database, another split) was resumed by a new trial with the same number: it had been
    trained on what is now validation data.
    """
    snap = _load_snapshot(last, ctx)
    if snap is not None and snap.get("identity") != identity:
        ctx.log(f"ignoring snapshot {last}: it belongs to {snap.get('identity')}, not {identity}")
        return None
    return snap


def _remove(folders: list[Path]) -> None:
    """Delete a finished trial's folders (its snapshots are of no more use)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _not_saved(trial: optuna.Trial, ctx: Context, refused: WriteRefused) -> None:
    """Fail ``trial`` because ``refused`` and re-queue it, as an interrupted one; leave it RUNNING where the database refuses too.

    Its folder is kept: the retry resumes from the last snapshot that was written whole.
    """
    try:
        record.write_failure(trial, record.FailKind.NOT_SAVED, f"{refused.what}; re-queued to run again")
        storage.requeue_interrupted(trial.study, trial.number)
        trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except Exception as e:
        if refusal(e) is None and not storage.lost_connection(e):
            raise
        ctx.log(f"trial {trial.number} not saved, and the database could not record it; the next run retries it once it is stale")
        return
    ctx.log(f"trial {trial.number} not saved: {refused.what}; re-queued")


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record(trial: optuna.Trial, ctx: Context, wall_s: float, history: Any, best: dict[str, Any]) -> None:
    """Per-trial attributes and the learning-curve artifact (also for pruned trials); ``wall_s``: its training time."""

    images_per_s = peak_mem_mb = status = None  # not known for a pruned trial
    if history is None:
        # Pruned: the history is not returned; rebuild the curve from the reports.
        reports = trial.storage.get_trial(optuna_compat.trial_id(trial)).intermediate_values
        epochs = [{"epoch": k, "val_acc": v} for k, v in sorted(reports.items())]
    else:
        epochs = [dict(e.__dict__) for e in history.epochs]
        images_per_s = sum(e["images_per_s"] for e in epochs) / max(1, len(epochs))
        peak_mem_mb = max((e["peak_mem_mb"] for e in epochs), default=0.0)
        status = history.status
    record.write_result(trial, epochs_run=len(epochs), best_epoch=best["epoch"], wall_s=round(wall_s, 2),
                        images_per_s=images_per_s, peak_mem_mb=peak_mem_mb, status=status)  # fmt: skip
    _upload_curve(trial, ctx, epochs)


def _upload_curve(trial: optuna.Trial, ctx: Context, epochs: list[dict[str, Any]]) -> None:
    """The learning curve as the image artifact ``trial-N-curve.png``."""
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / f"trial-{trial.number}-curve.png"
        with refusing(png):  # a full temp folder
            plots.learning_curve(epochs, png, title=f"{ctx.spec.name} trial {trial.number}")
        optuna.artifacts.upload_artifact(artifact_store=ctx.store, file_path=str(png), study_or_trial=trial, mimetype="image/png")


def stop_paused(trial: optuna.Trial, ctx: Context, text: str) -> None:
    """Stop a paused trial for good (its study is ending): its reason, its curve, PRUNED, its snapshot deleted.

    ``trial``: a paused trial this worker claimed (`record.claim_paused`).
    """
    record.write_schedule(trial, text)
    reports = trial.storage.get_trial(optuna_compat.trial_id(trial)).intermediate_values
    _upload_curve(trial, ctx, [{"epoch": k, "val_acc": v} for k, v in sorted(reports.items())])
    trial.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    root = storage.retried_trial_number(trial)
    remove_trial_folder(ctx.results, trial.study, trial.number if root is None else root)


def remove_trial_folder(results: Path, study: optuna.Study, lineage: int) -> None:
    """Delete the folder (snapshot) of configuration ``lineage``, which will never train again."""
    _remove([trial_folder(results, study, lineage)])


def _keep_checkpoint(trial: optuna.Trial, ctx: Context, params: TrialParams, best: dict[str, Any], value: float) -> None:
    """Upload this trial's best checkpoint if it is among the `KEEP_BEST` best so far.

    A checkpoint that later drops out of the best few is kept: its artifact entry lives in the
    finished trial's system attributes, which Optuna will not change, so deleting the file left
    an entry whose download failed (optuna-dashboard answered 500). Only trials that were among
    the best when they finished write one, a few per study.
    """
    states = (optuna.trial.TrialState.COMPLETE,)
    others = [t for t in trial.study.get_trials(deepcopy=False, states=states) if t.value is not None]
    ranked = sorted([*(float(t.value) for t in others if t.value is not None), value], reverse=True)
    if best["state"] is None or value < ranked[min(KEEP_BEST, len(ranked)) - 1]:
        return  # not among the best: never written
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trial-{trial.number}-best.pt"
        _save_best(path, params, best, ctx)
        artifact_id = optuna.artifacts.upload_artifact(artifact_store=ctx.store, file_path=str(path), study_or_trial=trial)
    record.write_checkpoint(trial, artifact_id)


def _save_best(path: Path, params: TrialParams, best: dict[str, Any], ctx: Context) -> None:
    checkpoint.save(
        {
            "model_state": best["state"],
            "params": params.to_dict(),
            "epoch": best["epoch"],
            "val_acc": best["acc"],
            "classes": list(ctx.data.classes),
            "mean": list(ctx.data.mean),
            "std": list(ctx.data.std),
        },
        path,
    )


def _progress(ctx: Context, trial: optuna.Trial, n_done: int, r: Any, started: float) -> None:
    """One live line per epoch."""
    try:
        best = f"{trial.study.best_value:.4f}"
    except ValueError:
        best = "-"  # no complete trial yet
    trials = trial.study.get_trials(deepcopy=False)
    left = time_left(ctx.spec, ctx.target_trials, trials, n_done, r, started, ctx.trial_seconds)
    ctx.log(
        f"trial {n_done + 1}/{ctx.target_trials} (#{trial.number}) epoch {r.epoch}/{ctx.spec.epochs}  "
        f"val_acc {r.val_acc:.4f}  best {best}  {r.images_per_s:,.0f} img/s  ~{_duration(left)} left"
    )
    sys.stdout.flush()


def time_left(spec: StudySpec, target: int, trials: list[optuna.trial.FrozenTrial], n_done: int, r: Any, started: float,
              trial_seconds: list[float]) -> float:  # fmt: skip
    """Seconds the study still needs, for the progress line, after epoch ``r`` of a trial that began at ``started``.

    The work left is shared by the trials training now (one per worker, on every machine; paused
    ones train nothing), each at this trial's pace. Under pause and promote the work is the epochs the
    rule still has to train (`scheduling.epochs_left`); otherwise this trial's epochs left and the
    mean trial's length (this worker's finished trials) for each trial still to finish.
    """
    training = max(1, sum(1 for t in trials if t.state == optuna.trial.TrialState.RUNNING and not record.is_paused(t)))
    rule = scheduling.rule_of(spec)
    if rule is None:
        per_epoch = (time.time() - started) / max(1, r.epoch)
        left_trial = per_epoch * (spec.epochs - r.epoch)
        mean_trial = sum(trial_seconds) / len(trial_seconds) if trial_seconds else per_epoch * spec.epochs
        return left_trial + mean_trial * max(0, target - n_done - 1) / training
    return r.seconds * scheduling.epochs_left(rule, scheduling.ladder(trials), target) / training


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
