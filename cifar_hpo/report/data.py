"""Report data: what the report shows, as plain dicts and lists (written to summary.json), before anything is drawn."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from cifar_hpo import storage
from cifar_hpo.errors import UserError
from cifar_hpo.models.final import FINAL_NAME, load_final
from cifar_hpo.storage import record

BASELINE = "baseline"  # study whose final model is the reference


MIN_TRIALS_FOR_IMPORTANCE = 2  # complete trials


def find_finals(results: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every final checkpoint under ``results`` (baseline first, then by study name), loaded and checked.

    Raises:
        UserError: none found, a corrupt file, or final models whose classes differ.
    """
    paths = sorted(results.glob(f"*/{FINAL_NAME}")) if results.is_dir() else []
    if not paths:
        raise UserError(
            f"no final models in {results} (no {results}/<study>/{FINAL_NAME}); make them with "
            f"`cifar-hpo retrain --study NAME`, and the baseline with `cifar-hpo retrain --study {BASELINE} --default-params`"
        )
    finals = [(p, load_final(p)) for p in paths]
    first_path, first = finals[0]
    for path, f in finals[1:]:
        if list(f["classes"]) != list(first["classes"]):
            raise UserError(
                f"final models disagree on classes: {first_path} has {list(first['classes'])}, {path} has "
                f"{list(f['classes'])}; retrain them on the same data, or report them from separate --results folders"
            )
    finals.sort(key=lambda pf: (pf[1]["study"] != BASELINE, pf[1]["study"]))
    return finals


def load_studies(names: list[str], url: str) -> tuple[dict[str, optuna.Study], list[str]]:
    """The studies of ``names`` present in the storage (read-only), and notes on the missing ones."""
    notes: list[str] = []
    st = storage.open_existing(url)
    if st is None:
        return {}, [f"no study database at {storage.mask_url(url)}: study plots skipped (pass --storage)"]
    present = {s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)}
    studies = {}
    for name in names:
        if name in present:
            studies[name] = optuna.load_study(study_name=name, storage=st)
        else:
            notes.append(f"study {name!r} is not in {storage.mask_url(url)}: its study plots are skipped")
    return studies, notes


def label(final: dict[str, Any]) -> str:
    """How a final model is named in figures: ``study (model[, defaults])``."""
    extra = ", defaults" if final["default_params"] else ""
    return f"{final['study']} ({final['model']}{extra})"


def _params_text(final: dict[str, Any]) -> str:
    if final["default_params"]:
        return f"default {final['spec'].get('recipe', 'cpu')} recipe of {final['spec']['model']}"
    items = sorted(final["optuna_params"].items())
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def summary_rows(finals: list[tuple[Path, dict[str, Any]]], studies: dict[str, optuna.Study]) -> list[dict[str, Any]]:
    """One row per final model; accuracies as fractions, the difference to the baseline in points."""
    base = next((f for _, f in finals if f["study"] == BASELINE), None)
    rows = []
    for path, f in finals:
        study = studies.get(f["study"])
        best = storage.best_value(study)
        accs = [float(a) for a in f["test_acc"]]
        mean = float(np.mean(accs))
        rows.append(
            {
                "study": f["study"],
                "label": label(f),
                "model": f["model"],
                "checkpoint": str(path),
                "default_params": bool(f["default_params"]),
                "trial": f["trial"],
                "best_params": _params_text(f),
                "optuna_params": f["optuna_params"],
                "params": f["params"],
                # The study's best validation accuracy: from the storage when the study is there.
                "best_val_acc": best if best is not None else f["best_value"],
                "best_val_acc_from": "storage" if best is not None else "checkpoint",
                "trial_val_acc": f["trial_value"],
                "test_acc": accs,
                "test_acc_mean": mean,
                "test_acc_std": float(f["test_acc_std"]),
                "seeds": len(accs),
                "diff_points": None if base is None else 100.0 * (mean - float(np.mean(base["test_acc"]))),
                "params_count": int(f["params_count"]),
                "train_seconds": float(np.mean(f["train_seconds"])),
                "images_per_s": float(np.mean(f["images_per_s"])),
                "hardware": f["hardware"],
                "epochs": int(f["epochs"]),
                "split_hash": f["split_hash"],
                "data": f["data"]["source"],
                "subset": f["data"].get("subset"),
            }
        )
    return rows


def curves_data(finals: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per model: epochs, test accuracy and training loss, mean / min / max over seeds."""
    out = []
    for _, f in finals:
        runs = [h["epochs"] for h in f["histories"]]
        n = min(len(r) for r in runs)
        acc = np.array([[e["val_acc"] for e in r[:n]] for r in runs], dtype=float)
        loss = np.array([[e["train_loss"] for e in r[:n]] for r in runs], dtype=float)
        out.append(
            {
                "label": label(f),
                "study": f["study"],
                "epochs": list(range(1, n + 1)),
                "test_acc_mean": acc.mean(0).tolist(),
                "test_acc_min": acc.min(0).tolist(),
                "test_acc_max": acc.max(0).tolist(),
                "train_loss_mean": loss.mean(0).tolist(),
                "train_loss_min": loss.min(0).tolist(),
                "train_loss_max": loss.max(0).tolist(),
            }
        )
    return out


def per_class_data(finals: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """Test accuracy per class (mean over seeds): rows = models, columns = classes."""
    return {
        "classes": list(finals[0][1]["classes"]),
        "labels": [label(f) for _, f in finals],
        "acc": [np.mean(np.array(f["per_class_acc"], dtype=float), axis=0).tolist() for _, f in finals],
    }


def confusion_data(final: dict[str, Any]) -> dict[str, Any]:
    """Confusion counts summed over seeds, and row-normalized (fractions of each true class)."""
    counts = np.sum(np.array(final["confusion"], dtype=np.int64), axis=0)
    rows = np.maximum(counts.sum(1, keepdims=True), 1)
    return {
        "label": label(final),
        "classes": list(final["classes"]),
        "seeds": len(final["confusion"]),
        "counts": counts.tolist(),
        "normalized": (counts / rows).tolist(),
    }


def history_data(study: optuna.Study) -> dict[str, Any]:
    """Trials in order: value of complete ones, last reported value of pruned ones, best so far."""
    points, best_so_far, best = [], [], -math.inf
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE and t.value is not None:
            points.append({"trial": t.number, "value": float(t.value), "state": "complete"})
            best = max(best, float(t.value))
            best_so_far.append({"trial": t.number, "value": best})
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            last = max(t.intermediate_values)
            points.append({"trial": t.number, "value": float(t.intermediate_values[last]), "state": "pruned", "epoch": last})
    counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    return {"study": study.study_name, "points": points, "best_so_far": best_so_far, "counts": counts}


def importance_data(study: optuna.Study) -> dict[str, Any]:
    """Parameter importances with the first evaluator that works here, or a note why there are none.

    PED-ANOVA needs only numpy; fANOVA and mean decrease impurity need
    scikit-learn, tried only where PED-ANOVA fails.
    """
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {"importances": {}, "evaluator": None,
                "note": f"skipped: {len(complete)} complete trial(s), importances need at least {MIN_TRIALS_FOR_IMPORTANCE}"}  # fmt: skip
    if not any(t.params for t in complete):
        return {"importances": {}, "evaluator": None, "note": "skipped: the trials have no parameters"}
    evaluators = ("PedAnovaImportanceEvaluator", "FanovaImportanceEvaluator", "MeanDecreaseImpurityImportanceEvaluator")
    problems = []
    for name in evaluators:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                evaluator = getattr(optuna.importance, name)()
                values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as e:  # ImportError without scikit-learn; ValueError on degenerate studies
            problems.append(f"{name}: {type(e).__name__}")
            continue
        importances = {k: float(v) for k, v in values.items()}
        if len(set(importances.values())) == 1 and len(importances) > 1:
            # PED-ANOVA says so itself (a warning) when too few trials separate good from bad ones.
            return {"importances": {}, "evaluator": name, "all_equal": importances,
                    "note": f"skipped: all {len(importances)} parameters came out equally important (too few trials)"}  # fmt: skip
        note = "; ".join(sorted({str(w.message).strip().splitlines()[0] for w in caught if "importance" in str(w.message).lower()}))
        return {"importances": importances, "evaluator": name, "note": note}
    return {"importances": {}, "evaluator": None, "note": "skipped: no importance evaluator works here (" + "; ".join(problems) + ")"}


def intermediate_data(study: optuna.Study) -> dict[str, Any]:
    """Validation accuracy per epoch of every complete and pruned trial."""
    trials = []
    best = study.best_trial.number if storage.best_value(study) is not None else None
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        trials.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "best": t.number == best,
                "epochs": steps,
                "values": [float(t.intermediate_values[s]) for s in steps],
            }
        )
    return {"study": study.study_name, "trials": trials}


def pruning_data(study: optuna.Study) -> dict[str, Any]:
    """Trial counts by state and epochs trained against what the same trials would have trained unpruned."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    spec = study.user_attrs.get("spec") or {}
    full = int(spec.get("epochs") or max((len(t.intermediate_values) for t in finished), default=0))
    trained = sum(len(t.intermediate_values) for t in finished)
    unpruned = full * len(finished)
    return {
        "counts": counts,
        "pruner": (spec.get("pruner") or {}).get("kind"),
        "epochs_per_trial": full,
        "epochs_trained": trained,
        "epochs_unpruned": unpruned,
        "epochs_ratio": trained / unpruned if unpruned else None,
    }


def provenance_data(finals: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per final model: where its images came from, the split, the classes, hardware and libraries."""
    out = []
    for _, f in finals:
        d = f["data"]
        out.append(
            {
                "study": f["study"],
                "label": label(f),
                "source": d["source"],
                "subset": d.get("subset"),
                "split_seed": d.get("split_seed"),
                "val_fraction": d.get("val_fraction"),
                "split_hash": f["split_hash"],
                "train_images": d.get("train_images"),
                "test_images": d.get("test_images"),
                "classes": list(f["classes"]),
                "input_size": list(f["input_size"]),
                "hardware": f["hardware"],
                "versions": dict(f["versions"]),
                "created": f["created"],
            }
        )
    return out


def study_pruning_data(study: optuna.Study) -> dict[str, Any]:
    """Best value vs epochs consumed, and each epoch's rank correlation with the final value.

    Epochs consumed are the epochs each finished trial reported, in completion
    order (cooldown probes are not counted here; ``bench search`` counts them).
    The correlation uses the study's own completed trials: the accuracy they
    reported at epoch k against their final value, so a user sees whether the
    rungs their pruner compares rank trials as the end does.
    """
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    done.sort(key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0, t.number))
    epochs, best, points = 0, None, []
    for t in done:
        epochs += len(t.intermediate_values)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = t.value if best is None else max(best, t.value)
        points.append({"trial": t.number, "state": t.state.name.lower(), "epochs": epochs, "best": best,
                       "trial_epochs": len(t.intermediate_values)})  # fmt: skip
    complete = [t for t in done if t.state == TrialState.COMPLETE and t.value is not None and t.intermediate_values]
    pruned_at = sorted({max(t.intermediate_values) for t in done if t.state == TrialState.PRUNED and t.intermediate_values})
    last = max((max(t.intermediate_values) for t in complete), default=0)
    rho = {}
    for e in range(1, last):
        pairs = [(t.intermediate_values[e], float(t.value or 0.0)) for t in complete if e in t.intermediate_values]
        if len(pairs) >= 3:
            rho[e] = spearman([a for a, _ in pairs], [b for _, b in pairs])
    spec = study.user_attrs.get("spec")
    kind = (spec.get("pruner") or {}).get("kind") if isinstance(spec, dict) else None
    return {"study": study.study_name, "points": points, "spearman": rho, "pruned_at": pruned_at,
            "complete": len(complete), "pruned": sum(t.state == TrialState.PRUNED for t in done), "pruner": kind}  # fmt: skip


def pruning_line(data: dict[str, Any]) -> str:
    """One line a user can act on: how well the pruned-at epochs rank this study's completed trials."""
    name, rho = data["study"], data["spearman"]
    if data["complete"] < 3 or not rho:
        return f"{name}: pruning: too few completed trials ({data['complete']}) to check how well early epochs rank"
    epochs = [e for e in data["pruned_at"] if e in rho] or sorted(rho)[:3]
    shown = ", ".join(f"epoch {e} {rho[e]:+.2f}" for e in epochs)
    worst = min(rho[e] for e in epochs)
    # What docs/pruning.md measured: pause and promote loses least at these costs; the probe and EMA
    # fidelities ranked no better than the plain accuracy on the fast recipe.
    if worst >= 0.7:
        advice = "early epochs rank trials as the end does"
    elif data.get("pruner") == "promote":
        advice = ("early epochs rank the completed (promoted) trials poorly; pause and promote ranked every paused trial "
                  "again as later trials arrived; raise [pruner] min_resource if good trials were stopped early")
    else:
        advice = ("early epochs rank trials poorly: a pruner that stops trials there for good may drop good ones; "
                  "use [pruner] kind = \"promote\" (a paused trial is ranked again as later trials arrive) or raise min_resource")
    return (f"{name}: pruning: rank correlation (Spearman) of the accuracy at the rungs with the final accuracy, "
            f"over {data['complete']} completed trials: {shown}; {advice}")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average the ranks of ties
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def anytime_data(study: optuna.Study, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best validation accuracy against the device hours the study's trials spent: the anytime curve.

    Every trial that ended (complete, pruned or failed) is charged its device time
    (`record.device_seconds`) when it ended, so the x axis is what the search cost on all
    workers and machines together; the best value moves only at complete trials. With
    ``baseline`` (the baseline's final model), its cost is one of its training runs (mean over
    its seeds, on train + validation) and its accuracy is its test accuracy: a reference on the
    same cost axis, not a validation score.
    """
    ended = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.datetime_complete is not None]
    ended.sort(key=lambda t: (t.datetime_complete, t.number))
    spent, best, points = 0.0, None, []
    for t in ended:
        spent += record.device_seconds(t)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = t.value if best is None else max(best, t.value)
        points.append({"trial": t.number, "state": t.state.name.lower(), "device_hours": spent / 3600, "best": best})
    counts = {s: sum(p["state"] == s for p in points) for s in ("complete", "pruned", "fail")}
    out: dict[str, Any] = {"study": study.study_name, "points": points, "device_hours": spent / 3600, **counts}
    if baseline is not None and baseline.get("train_seconds"):
        out["baseline"] = {"device_hours": float(np.mean(baseline["train_seconds"])) / 3600,
                           "test_acc": float(baseline["test_acc_mean"])}  # fmt: skip
    return out
