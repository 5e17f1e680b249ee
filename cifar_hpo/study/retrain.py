"""``cifar-hpo retrain``: retrain a trial on train + validation and test it once.

    cifar-hpo retrain --study fast --seeds 3                    # best trial, 3 seeds
    cifar-hpo retrain --study fast --trial 12                   # another complete trial
    cifar-hpo retrain --study baseline --default-params --seeds 3   # the reference
    cifar-hpo retrain --study fast --epochs 2 --subset 2000     # a quick look

The trial's parameters are replayed through the study's search space
(``suggest(FixedTrial(trial.params), recipe)``) and checked against the
``trial_params`` the trial stored. With ``--default-params`` the model's
default recipe (``spec.default_recipe``: the registry's recipe for the study's
``recipe`` kind, the one ``cifar-hpo train`` uses) is trained instead (no trial
needed): that is how the baseline, the original handcrafted CNN with its
published recipe, is made.

Protocol: the model trains on the union of the study's training and
validation images (``data.final_data``) for the study's full epoch budget
(the epochs the study ran with, unless ``--epochs``), once per seed 0..K-1
(seed k seeds initialisation, batch order, augmentation and dropout), and is
evaluated once on the test split. Nothing is decided on test: no epoch or seed
is picked by its test score. The per-epoch test accuracy is recorded as a
learning curve only.

Data: unless ``--data`` / ``--subset`` are given, the data source, subset,
validation fraction and split seed the study ran with (its ``spec`` user
attribute) are used, so the trial's validation score and the final model come
from the same images.

Output: ``RESULTS/<study>/final.pt`` (its format: `cifar_hpo.finalmodel`), written atomically and
loadable with ``torch.load(weights_only=True)``: the weights of seed 0 (the
first seed; every seed is an equally valid sample of the recipe, and a fixed
choice keeps the file reproducible without looking at test scores) and the
metrics of all seeds; ``final.json`` beside it holds the same metrics without
weights. An interrupted retrain resumes: after every epoch a snapshot goes to
``RESULTS/<study>/retrain/seed<k>.partial.pt``, a finished seed to
``seed<k>.done.pt``; the same command skips finished seeds and resumes the
partial one from its last epoch. Partials record the parameters, epochs and
split they belong to; one from another run is ignored (with a message). The
folder is deleted once ``final.pt`` is written.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from cifar_hpo import models, storage, training
from cifar_hpo.device import device_name, library_versions
from cifar_hpo.errors import UserError
from cifar_hpo.models.final import FORMAT, FORMAT_VERSION, INPUT_SIZE, plain
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint, record
from cifar_hpo.study import pruning
from cifar_hpo.study.search_space import default_recipe
from cifar_hpo.study.spec import DataSpec, StudySpec

if TYPE_CHECKING:
    from cifar_hpo.data import DeviceData
    from cifar_hpo.training.loop import EpochResult


RETRAIN_DIR = "retrain"


@dataclass(frozen=True)
class Source:
    """Which parameters are retrained, and where they came from.

    Attributes:
        study: study name (the study file's ``name``).
        trial: trial number, or None for ``--default-params``.
        default_params: the model's default recipe was used (no trial).
        params: what is trained.
        optuna_params: the trial's Optuna parameters (empty for defaults).
        trial_value: the trial's validation accuracy (None for defaults).
        best_value: the study's best validation accuracy (None without a study).
        study_spec: the ``spec`` user attribute of the study (the spec it ran with), or None.
        study_split_hash: the split hash the study's trials saw, or None.
    """

    study: str
    trial: int | None
    default_params: bool
    params: TrialParams
    optuna_params: dict[str, Any]
    trial_value: float | None
    best_value: float | None
    study_spec: dict[str, Any] | None
    study_split_hash: str | None


def load_study(name: str, url: str) -> optuna.Study:
    """The study ``name`` in the storage at ``url``, read-only.

    Raises:
        UserError: no database there, or no study of that name (the message lists those present).
    """
    st = storage.open_existing(url)
    if st is None:
        raise UserError(
            f"no study database at {storage.mask_url(url)}; run `cifar-hpo run --study {name}` first, "
            "or pass --storage/--results where the study is (or --default-params to train the defaults)"
        )
    try:
        return optuna.load_study(study_name=name, storage=st)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)) or "none"
        raise UserError(
            f"no study {name!r} in {storage.mask_url(url)}; studies there: {names} "
            f"(run `cifar-hpo run --study {name}` first, or pass --default-params)"
        ) from None


def select_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """Trial ``number``, or the best trial when None; it must be COMPLETE.

    Raises:
        UserError: no such trial, not complete, or no complete trial at all.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if number is None:
        if not complete:
            counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in TrialState)
            raise UserError(
                f"study {study.study_name!r} has no complete trial ({counts}); "
                f"run `cifar-hpo run --study {study.study_name}` until one completes, or pass --default-params"
            )
        return study.best_trial
    found = next((t for t in trials if t.number == number), None)
    if found is None:
        raise UserError(
            f"study {study.study_name!r} has no trial {number} (trials 0..{len(trials) - 1}); "
            f"see `cifar-hpo status --study {study.study_name}`"
        )
    if found.state != TrialState.COMPLETE:
        ok = ", ".join(str(t.number) for t in complete[:20]) or "none"
        raise UserError(f"trial {number} of study {study.study_name!r} is {found.state.name.lower()}, not complete; complete trials: {ok}")
    return found


def replay_params(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> TrialParams:
    """The trial's TrialParams, replayed with a FixedTrial through `pruning.trained_params`, as the objective built them.

    That is the search space's suggestion under the study's fidelity (the probe fidelity
    trains the wsd schedule), the same function the objective calls. The replay is
    checked against the ``trial_params`` user attribute the trial stored. Where
    they differ (the search space was edited after the study ran), the stored
    parameters win, since they are what the trial was scored with, and a warning
    names the differing fields.

    Raises:
        UserError: the search space cannot replay the trial and no stored parameters exist.
    """
    stored_raw = record.read(trial).trial_params
    stored = TrialParams.from_dict(stored_raw) if stored_raw is not None else None
    try:
        replayed = pruning.trained_params(spec, optuna.trial.FixedTrial(dict(trial.params)))
    except UserError:
        raise
    except Exception as e:
        if stored is None:
            raise UserError(
                f"search space {spec.search_space!r} cannot replay trial {trial.number} "
                f"({type(e).__name__}: {e}) and the trial stored no trial_params; restore search_spaces/{spec.search_space}.py"
            ) from None
        _warn(f"search space {spec.search_space!r} cannot replay trial {trial.number} ({type(e).__name__}: {e}); "
              "using the parameters the trial stored")  # fmt: skip
        return stored
    if stored is not None and stored != replayed:
        a, b = stored.to_dict(), replayed.to_dict()
        diff = ", ".join(f"{k}: stored {a[k]!r} vs replayed {b[k]!r}" for k in a if a[k] != b[k])
        _warn(f"search space {spec.search_space!r} replays trial {trial.number} differently ({diff}); "
              "using the parameters the trial stored")  # fmt: skip
        return stored
    return replayed


def retrain_source(spec: StudySpec, url: str, *, trial: int | None = None, default_params: bool = False) -> Source:
    """Pick the parameters to retrain: trial ``trial`` of the study (its best when None), or the model's default recipe.

    Raises:
        UserError: both ``trial`` and ``default_params``; no such study or trial (see `load_study`, `select_trial`).
    """
    if default_params:
        if trial is not None:
            raise UserError("--trial and --default-params exclude each other: pass one of them")
        params = default_recipe(spec)
        study = _study_if_present(spec.name, url)
        best = storage.best_value(study)
        attrs = study.user_attrs if study is not None else {}
        return Source(spec.name, None, True, params, {}, None, best, attrs.get("spec"), attrs.get("split_hash"))
    study = load_study(spec.name, url)
    chosen = select_trial(study, trial)
    attrs = study.user_attrs
    ran = attrs.get("spec")
    fixed = ran.get("params") if isinstance(ran, dict) else None
    if isinstance(fixed, dict) and fixed:  # the run's --set: part of what the trial trained
        spec = spec.replace(params=fixed)
    return Source(
        study=spec.name,
        trial=chosen.number,
        default_params=False,
        params=replay_params(spec, chosen),
        optuna_params=dict(chosen.params),
        trial_value=float(chosen.value) if chosen.value is not None else None,
        best_value=storage.best_value(study),
        study_spec=attrs.get("spec"),
        study_split_hash=attrs.get("split_hash"),
    )


def _study_if_present(name: str, url: str) -> optuna.Study | None:
    st = storage.open_existing(url)
    if st is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=st)
    except KeyError:
        return None


def final_spec(spec: StudySpec, source: Source, *, epochs: int | None = None, data: str | None = None,
               subset: int | None = None) -> StudySpec:
    """The spec to retrain with: the study's recorded epochs and data, then the command line's overrides."""
    if source.study_spec:
        ran = source.study_spec
        recorded = ran.get("data") or {}
        known = {f.name for f in dataclasses.fields(DataSpec)}
        spec = spec.replace(
            epochs=int(ran.get("epochs", spec.epochs)),
            data=dataclasses.replace(spec.data, **{k: v for k, v in recorded.items() if k in known}),
        )
    return spec.with_overrides(epochs=epochs, data=data, subset=subset)


def identity(source: Source, epochs: int, data: DeviceData) -> dict[str, Any]:
    """What a partial or finished seed belongs to; a file with another identity is not reused."""
    return {
        "study": source.study,
        "trial": source.trial,
        "default_params": source.default_params,
        "params": source.params.to_dict(),
        "epochs": epochs,
        "split_hash": data.split_hash,
        "classes": list(data.classes),
    }


def _refuse_other_classes(path: Path, saved: dict[str, Any], data: DeviceData) -> None:
    """A seed file made on data with other classes cannot be resumed or reused here: say which data it needs."""
    classes = list(saved.get("identity", {}).get("classes", []))
    if classes != list(data.classes):
        raise UserError(
            f"{path} was made on data with classes {classes}, this data has {list(data.classes)}; "
            f"retrain with the --data it was made on, or delete {path.parent} to start over"
        )


def _same_run(path: Path, saved: dict[str, Any], ident: dict[str, Any]) -> bool:
    """True when a saved seed file belongs to this run; else say why it is ignored."""
    had = saved.get("identity", {})
    differs = [k for k in ("study", "trial", "params", "epochs", "split_hash") if had.get(k) != ident[k]]
    if differs:
        print(f"ignoring {path}: it belongs to another run (different {', '.join(differs)})", flush=True)
        return False
    return True


def retrain_seed(source: Source, data: DeviceData, epochs: int, seed: int, n_seeds: int, folder: Path) -> dict[str, Any]:
    """Train one seed (resuming its partial when there is one), test it once, return its record.

    The record (also saved as ``seed<k>.done.pt``) holds the test metrics, the
    history, timings and, for seed 0, the weights.
    """

    ident = identity(source, epochs, data)
    done_path, partial_path = folder / f"seed{seed}.done.pt", folder / f"seed{seed}.partial.pt"
    tag = f"[seed {seed} ({seed + 1}/{n_seeds})]"
    if done_path.is_file():
        done = checkpoint.load(done_path)
        _refuse_other_classes(done_path, done, data)
        if _same_run(done_path, done, ident):
            print(f"{tag} already finished: test acc {done['test_acc']:.4f} (from {done_path})", flush=True)
            return done
    resume = None
    if partial_path.is_file():
        partial = checkpoint.load(partial_path, map_location=data.device)
        _refuse_other_classes(partial_path, partial, data)
        if _same_run(partial_path, partial, ident):
            resume = partial["snapshot"]
            print(f"{tag} resuming from epoch {int(resume['epoch'])}/{epochs} ({partial_path})", flush=True)

    torch.manual_seed(seed)  # initial weights; train() seeds batches, augmentation and dropout
    model = models.build(source.params, data.num_classes).to(data.device)

    def on_epoch(r: EpochResult, snapshot: Any) -> None:
        print(
            f"{tag} epoch {r.epoch:>3}/{epochs}  loss {r.train_loss:.4f}  train_acc {r.train_acc:.4f}  "
            f"test_acc {r.val_acc:.4f}  lr {r.lr:.2e}  {r.images_per_s:,.0f} img/s  {r.seconds:.1f} s",
            flush=True,
        )
        if r.epoch < epochs:
            checkpoint.save({"identity": ident, "snapshot": snapshot()}, partial_path)

    history = training.train(model, data, source.params, epochs=epochs, seed=seed, on_epoch=on_epoch, resume=resume)
    if history.status != "ok":
        raise UserError(
            f"{tag} training stopped with status {history.status!r} after {len(history.epochs)} epochs "
            f"(non-finite loss): the recipe diverges on train+val; retrain another --trial, or fewer --epochs"
        )
    metrics = training.evaluate(model, data.eval_x, data.eval_y, mean=data.mean, std=data.std, precision=source.params.precision)
    confusion = metrics.confusion.astype(np.int64)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    epochs_run = history.epochs
    record = {
        "identity": ident,
        "seed": seed,
        "test_acc": float(metrics.acc),
        "test_loss": float(metrics.loss),
        "per_class_acc": [float(v) for v in per_class],
        "confusion": confusion.tolist(),
        "history": history.to_dict(),
        "seconds": float(history.seconds),
        "images_per_s": float(np.mean([e.images_per_s for e in epochs_run])) if epochs_run else 0.0,
        "peak_mem_mb": float(max((e.peak_mem_mb for e in epochs_run), default=0.0)),
        "params_count": int(history.params_count),
        # Only seed 0's weights go into final.pt; the others need not be kept.
        "model_state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if seed == 0 else None,
    }
    checkpoint.save(record, done_path)
    partial_path.unlink(missing_ok=True)
    print(f"{tag} test acc {metrics.acc:.4f} (loss {metrics.loss:.4f}) in {history.seconds:.1f} s", flush=True)
    return record


def build_final(source: Source, spec: StudySpec, data: DeviceData, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of final.pt: weights of seed 0, metrics of every seed, provenance."""
    accs = [r["test_acc"] for r in records]
    std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0  # sample std over seeds
    state = records[0]["model_state"]
    final = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_state": None,  # set below, after the rest is made plain
        "weights_seed": records[0]["seed"],
        "model": source.params.model,
        "params": source.params.to_dict(),
        "classes": list(data.classes),
        "num_classes": data.num_classes,
        "mean": [float(v) for v in data.mean],  # per channel, [0, 1] units
        "std": [float(v) for v in data.std],
        "input_size": list(INPUT_SIZE),
        "study": source.study,
        "trial": source.trial,
        "default_params": source.default_params,
        "trial_value": source.trial_value,
        "best_value": source.best_value,
        "optuna_params": source.optuna_params,
        "split_hash": data.split_hash,
        "data": {
            "source": spec.data.source,
            "subset": spec.data.subset,
            "val_fraction": spec.data.val_fraction,
            "split_seed": spec.data.split_seed,
            "train_images": len(data.train_y),  # train + validation
            "test_images": len(data.eval_y),
        },
        "epochs": spec.epochs,
        "seeds": [r["seed"] for r in records],
        "test_acc": accs,
        "test_acc_mean": float(np.mean(accs)),
        "test_acc_std": std,
        "test_loss": [r["test_loss"] for r in records],
        "per_class_acc": [r["per_class_acc"] for r in records],
        "confusion": [r["confusion"] for r in records],
        "histories": [r["history"] for r in records],
        "train_seconds": [r["seconds"] for r in records],  # per seed: training + per-epoch test evaluation
        "images_per_s": [r["images_per_s"] for r in records],  # per seed: training images/s, mean over epochs
        "peak_mem_mb": [r["peak_mem_mb"] for r in records],
        "params_count": records[0]["params_count"],
        "hardware": device_name(data.device),
        "device": str(data.device),
        "versions": {k: str(v) for k, v in library_versions().items()},  # torch's is a str subclass: not loadable safely
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
    }
    final = plain(final)
    final["model_state"] = state
    return final


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
