"""``cifar-hpo report``: every final model against the baseline, in figures and tables.

    cifar-hpo retrain --study baseline --default-params --seeds 3    # the reference
    cifar-hpo retrain --study fast --seeds 3
    cifar-hpo report                                                 # -> results/report/

Reads every ``RESULTS/*/final.pt`` (written by ``cifar-hpo retrain``) and, where
the study is in the storage, its trials (read-only). The baseline is the final
model of the study named ``baseline`` (the original handcrafted CNN and
recipe, ``--default-params``). Writes into ``--out`` (default ``RESULTS/report``):

- ``accuracy.png``: test accuracy of every final model, mean over seeds with the
  sample standard deviation as error bars and each seed as a dot; the baseline
  as a dashed line; the difference to it in points written beside each bar.
- ``learning_curves.png``: test accuracy and training loss per epoch of the
  final runs (mean over seeds, band = min..max over seeds), all models.
- ``per_class.png``: test accuracy per class and model (heatmap, mean over seeds).
- ``confusion_<study>.png``: confusion matrix per model (rows = true class,
  row-normalized %, counts summed over seeds).
- ``study_<study>_history.png``, ``study_<study>_importance.png``,
  ``study_<study>_intermediate.png``: per study in the storage, its
  optimization history, parameter importances (PED-ANOVA, which needs no
  scikit-learn; skipped with a note below 2 complete trials) and the
  validation accuracy per epoch of every trial (pruned trials dashed).
- ``summary.md`` and ``summary.json``: model, best parameters, best validation
  accuracy, test accuracy mean ± std, difference to the baseline in points,
  parameter count, training time, images/s, hardware.
- ``index.html``: the page to open and forward. One self-contained file
  (figures embedded as data: URIs, no network, no JavaScript; a
  Content-Security-Policy forbids anything else) with the comparison table, every
  figure, each study's best parameters and pruning statistics, data provenance
  (split hash, classes, image counts) and hardware. Every number in it is read
  from the same dict that is written to summary.json.

Plot data are computed first as plain dicts and lists (the ``*_data``
functions, also written to summary.json), then drawn (the ``draw_*``
functions), so the numbers in a figure can be checked without reading pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from cifar_hpo import checkpoint, storage
from cifar_hpo.errors import UserError
from cifar_hpo.finalmodel import FINAL_NAME, load_final
from cifar_hpo.plots import pyplot as _plt  # the one matplotlib setup

BASELINE = "baseline"  # study whose final model is the reference
MIN_TRIALS_FOR_IMPORTANCE = 2  # complete trials


# ---------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------- plot data (plain dicts)


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


# ---------------------------------------------------------------- drawing


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    _plt().close(fig)
    return path


def draw_accuracy(rows: list[dict[str, Any]], path: Path) -> Path:
    """Horizontal bars of test accuracy (%): mean, sample-std error bars, seeds as dots, baseline line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 1.3 + 0.55 * len(rows)), dpi=120)
    ys = np.arange(len(rows))[::-1]  # first row (the baseline) on top
    base = next((r for r in rows if r["study"] == BASELINE), None)
    top = max(100 * max(r["test_acc"]) for r in rows)
    for y, r in zip(ys, rows, strict=True):
        mean, std = 100 * r["test_acc_mean"], 100 * r["test_acc_std"]
        is_base = r["study"] == BASELINE
        ax.barh(y, mean, color="tab:gray" if is_base else "tab:blue", alpha=0.8, height=0.6)
        if r["seeds"] > 1:
            ax.errorbar(mean, y, xerr=std, color="black", capsize=4, lw=1.2)
        ax.plot([100 * a for a in r["test_acc"]], [y] * r["seeds"], "o", ms=3.5, color="black", alpha=0.6, zorder=3)
        text = f"{mean:.1f}" + (f" ± {std:.1f}" if r["seeds"] > 1 else "") + " %"
        if r["diff_points"] is not None and not is_base:
            text += f"   {r['diff_points']:+.1f} pts"
        elif is_base:
            text += "   (baseline)"
        ax.text(max(mean + std, max(100 * a for a in r["test_acc"])) + 1.0, y, text, va="center", fontsize=9)
    if base is not None:
        ax.axvline(100 * base["test_acc_mean"], color="tab:gray", ls="--", lw=1, label="baseline mean")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, [r["label"] for r in rows])
    ax.set_xlim(0, min(130, top + 35))  # room for the annotations
    ax.set_xlabel("test accuracy (%)")
    n = sorted({r["seeds"] for r in rows})
    ax.set_title(f"Final models on the test split (error bars: std over {'/'.join(map(str, n))} seeds)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def draw_curves(curves: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy (%) and training loss per epoch of the final runs, one line per model."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        xs = c["epochs"]
        ax1.plot(xs, [100 * v for v in c["test_acc_mean"]], "o-", ms=3, color=color, label=c["label"])
        ax1.fill_between(xs, [100 * v for v in c["test_acc_min"]], [100 * v for v in c["test_acc_max"]], color=color, alpha=0.15)
        ax2.plot(xs, c["train_loss_mean"], "o-", ms=3, color=color, label=c["label"])
        ax2.fill_between(xs, c["train_loss_min"], c["train_loss_max"], color=color, alpha=0.15)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy during final training")
    ax2.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="Training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        _integer_ticks(ax, max((len(c["epochs"]) for c in curves), default=1))
    ax1.legend(fontsize=8, loc="lower right")
    fig.text(0.5, -0.02, "lines: mean over seeds; bands: min..max over seeds", ha="center", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _integer_ticks(ax: Any, last: int) -> None:
    """Whole-number x ticks (epochs), every one of them when there are few."""
    if last <= 20:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def _heatmap(ax: Any, values: np.ndarray, xlabels: list[str], ylabels: list[str], fmt: str, vmax: float = 100.0) -> Any:
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=40, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    fontsize = 8 if values.shape[1] <= 10 else 6
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize, color="white" if v < 0.6 * vmax else "black")
    return im


def draw_per_class(data: dict[str, Any], path: Path) -> Path:
    """Heatmap of test accuracy (%) per class (columns) and model (rows)."""
    plt = _plt()
    values = 100 * np.array(data["acc"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * len(data["classes"]) + 0.05 * max(map(len, data["labels"])),
                                    1.6 + 0.5 * len(data["labels"])), dpi=120)  # fmt: skip
    im = _heatmap(ax, values, data["classes"], data["labels"], "{:.0f}")
    fig.colorbar(im, ax=ax, label="test accuracy (%)", fraction=0.04)
    ax.set_title("Test accuracy per class (mean over seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_confusion(data: dict[str, Any], path: Path) -> Path:
    """Confusion matrix, row-normalized (% of each true class), counts summed over seeds."""
    plt = _plt()
    n = len(data["classes"])
    values = 100 * np.array(data["normalized"], dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * n, 2.0 + 0.55 * n), dpi=120)
    im = _heatmap(ax, values, data["classes"], data["classes"], "{:.0f}")
    fig.colorbar(im, ax=ax, label="% of the true class", fraction=0.04)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(np.sum(data["counts"]))
    ax.set_title(f"{data['label']}: confusion on test\n({total:,} predictions, {data['seeds']} seed(s))", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_history(data: dict[str, Any], path: Path) -> Path:
    """Validation accuracy (%) per trial number; pruned trials at their last epoch; best so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    done = [p for p in data["points"] if p["state"] == "complete"]
    pruned = [p for p in data["points"] if p["state"] == "pruned"]
    ax.plot([p["trial"] for p in done], [100 * p["value"] for p in done], "o", color="tab:blue", label="complete")
    if pruned:
        ax.plot([p["trial"] for p in pruned], [100 * p["value"] for p in pruned], "x", color="tab:gray",
                label="pruned (last reported epoch)")  # fmt: skip
    if data["best_so_far"]:
        b = list(data["best_so_far"])
        last = max(p["trial"] for p in data["points"])
        if last > b[-1]["trial"]:
            b.append({"trial": last, "value": b[-1]["value"]})  # the line runs on through later (pruned) trials
        ax.step([p["trial"] for p in b], [100 * p["value"] for p in b], where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial number", ylabel="validation accuracy (%)")
    c = data["counts"]
    ax.set_title(f"{data['study']}: optimization history ({c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed)",
                 fontsize=10)  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    fig.tight_layout()
    return _save(fig, path)


def draw_importance(study: str, data: dict[str, Any], path: Path) -> Path:
    """Horizontal bars of normalized parameter importances, largest on top."""
    plt = _plt()
    items = sorted(data["importances"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(items)), dpi=120)
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:green")
    for i, (_, v) in enumerate(items):
        ax.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, min(1.15, max((v for _, v in items), default=1.0) + 0.15))
    ax.set_xlabel("importance (normalized, sums to 1)")
    evaluator = (data["evaluator"] or "").replace("ImportanceEvaluator", "")
    ax.set_title(f"{study}: parameter importances ({evaluator})", fontsize=10)
    if data["note"]:
        fig.text(0.5, -0.02, data["note"][:120], ha="center", fontsize=7, color="tab:red")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def draw_intermediate(data: dict[str, Any], path: Path) -> Path:
    """Validation accuracy (%) per epoch of every trial: complete solid, pruned dashed gray, best thick red."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    seen: set[str] = set()
    for t in sorted(data["trials"], key=lambda t: (t["best"], t["state"] == "complete")):  # best drawn last, on top
        ys = [100 * v for v in t["values"]]
        if t["best"]:
            style = {"color": "tab:red", "lw": 2.2, "ls": "-", "alpha": 1.0, "label": f"best (trial {t['trial']})"}
        elif t["state"] == "complete":
            style = {"color": "tab:blue", "lw": 1.0, "ls": "-", "alpha": 0.6, "label": "complete"}
        else:
            style = {"color": "tab:gray", "lw": 1.0, "ls": "--", "alpha": 0.7, "label": "pruned"}
        if style["label"] in seen:
            style["label"] = "_nolegend_"
        seen.add(str(style["label"]))
        ax.plot(t["epochs"], ys, marker="o", ms=2.5, **style)
        if t["state"] == "pruned":
            ax.plot(t["epochs"][-1], ys[-1], "x", color="tab:gray", ms=6)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{data['study']}: validation accuracy per epoch of every trial")
    ax.title.set_fontsize(10)
    _integer_ticks(ax, max((e for t in data["trials"] for e in t["epochs"]), default=1))
    ax.grid(alpha=0.3)
    if data["trials"]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- summary


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def summary_markdown(rows: list[dict[str, Any]], figures: list[str], notes: list[str]) -> str:
    """summary.md: the table, notes and links to the figures."""
    head = (
        "| model | best parameters | best val acc (%) | test acc (%) mean ± std (n) | Δ baseline (pts) | parameters "
        "| train time (s/seed) | images/s | hardware |"
    )
    lines = ["# Final models against the baseline", "", head, "|" + "---|" * 9]
    for r in rows:
        test = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} ({r['seeds']})"
        diff = "-" if r["diff_points"] is None else f"{r['diff_points']:+.2f}"
        best = _pct(r["best_val_acc"])
        if r["default_params"] and r["best_val_acc"] is not None:
            best += " (study's best trial, not these parameters)"
        params = r["best_params"].replace("|", "/")
        if r["trial"] is not None:
            params = f"trial {r['trial']}: {params}"
        lines.append(
            f"| {r['label']} | {params} | {best} | {test} | {diff} | {r['params_count']:,} | {r['train_seconds']:.1f} "
            f"| {r['images_per_s']:,.0f} | {r['hardware']} |"
        )
    lines += [
        "",
        "Test accuracy: mean and sample standard deviation over seeds, each seed retrained on train + validation and "
        "tested once. Best val acc: the study's best trial (validation split, trial epochs). Δ baseline: difference of "
        "the mean test accuracies in percentage points. Train time: wall time per seed, training plus per-epoch evaluation.",
    ]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += ["", "## Figures", "", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the page

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # nothing but this file's own bytes
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.baseline td { background: #fafafa; color: #555; }
.pos { color: #1a7f37; } .neg { color: #c62828; } .small { font-size: 0.85em; color: #555; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } code { font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    import html

    return html.escape("-" if value is None else str(value), quote=True)


def _num(text: str, value: Any, cls: str = "") -> str:
    """A numeric cell that carries the number it shows (data-value), so tests compare it with summary.json."""
    extra = f" {cls}" if cls else ""
    return f'<td class="num{extra}" data-value="{_e(value)}">{_e(text)}</td>'


def _figure(out: Path, name: str, caption: str) -> str:
    import base64

    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return (f'<figure id="fig-{_e(name)}"><img src="data:image/png;base64,{data}" alt="{_e(caption)}" data-name="{_e(name)}">'
            f"<figcaption>{_e(name)}: {_e(caption)}</figcaption></figure>")  # fmt: skip


FIGURE_CAPTIONS = {
    "accuracy.png": "test accuracy of every final model, mean ± sample std over seeds (dots: seeds); dashed: the baseline",
    "learning_curves.png": "test accuracy and training loss per epoch of the final runs (mean over seeds, band min..max)",
    "per_class.png": "test accuracy per class and model (mean over seeds)",
}


def _caption(name: str) -> str:
    if name in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[name]
    if name.startswith("confusion_"):
        return f"confusion matrix of {name[len('confusion_'):-4]} on the test split (% of each true class, counts summed over seeds)"
    for suffix, what in (("_history.png", "optimization history: validation accuracy per trial, best so far"),
                         ("_importance.png", "parameter importances"),
                         ("_intermediate.png", "validation accuracy per epoch of every trial (pruned dashed)")):  # fmt: skip
        if name.startswith("study_") and name.endswith(suffix):
            return f"study {name[len('study_'):-len(suffix)]}: {what}"
    return name


def summary_html(summary: dict[str, Any], out: Path) -> str:
    """index.html from the summary dict (the one written to summary.json) and the PNGs in ``out``."""
    rows, notes = summary["rows"], summary["notes"]
    table = [
        "<table id=\"comparison\"><thead><tr><th>model</th><th>test accuracy (%)<br>mean ± std</th><th>seeds</th>"
        "<th>Δ baseline (points)</th><th>best val acc (%)</th><th>parameters</th><th>train time (s/seed)</th>"
        "<th>images/s</th><th>hardware</th></tr></thead><tbody>"
    ]
    for r in rows:
        is_base = r["study"] == summary["baseline"]
        test = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        if r["diff_points"] is None:
            diff, cls = "-", ""
        elif is_base:
            diff, cls = "(baseline)", ""
        else:
            diff, cls = f"{r['diff_points']:+.2f}", "pos" if r["diff_points"] > 0 else "neg" if r["diff_points"] < 0 else ""
        best = "-" if r["best_val_acc"] is None else f"{100 * r['best_val_acc']:.2f}"
        row_class = ' class="baseline"' if is_base else ""
        table.append(
            f'<tr data-study="{_e(r["study"])}"{row_class}><td>{_e(r["label"])}</td>'
            + f'<td class="num" data-value="{r["test_acc_mean"]!r}" data-std="{r["test_acc_std"]!r}">{_e(test)}</td>'
            + _num(str(r["seeds"]), r["seeds"])
            + _num(diff, r["diff_points"], cls)
            + _num(best, r["best_val_acc"])
            + _num(f"{r['params_count']:,}", r["params_count"])
            + _num(f"{r['train_seconds']:.1f}", r["train_seconds"])
            + _num(f"{r['images_per_s']:,.0f}", r["images_per_s"])
            + f"<td>{_e(r['hardware'])}</td></tr>"
        )
    table.append("</tbody></table>")

    params = []
    for r in rows:
        origin = (f"defaults of the search space (no search); {_e(r['best_params'])}" if r["default_params"]
                  else f"trial {_e(r['trial'])} (validation accuracy {_e(_pct(r['trial_val_acc']))} %)")  # fmt: skip
        cells = "".join(f"<tr><td><code>{_e(k)}</code></td><td><code>{_e(v)}</code></td></tr>" for k, v in sorted(r["params"].items()))
        params.append(f'<h3 id="params-{_e(r["study"])}">{_e(r["label"])}</h3><p class="small">Parameters from {origin}; '
                      f"{_e(r['epochs'])} epochs per seed.</p>"
                      f'<table class="params"><tr><th>parameter</th><th>value</th></tr>{cells}</table>')  # fmt: skip

    pruning = []
    for name, st in summary["studies"].items():
        p = st.get("pruning")
        if p is None:
            continue
        c = p["counts"]
        ratio = "-" if p["epochs_ratio"] is None else f"{100 * p['epochs_ratio']:.0f} %"
        pruning.append(
            f'<tr data-study="{_e(name)}"><td>{_e(name)}</td><td>{_e(p["pruner"])}</td>'
            + "".join(_num(str(c.get(k, 0)), c.get(k, 0)) for k in ("complete", "pruned", "fail", "running"))
            + _num(str(p["epochs_trained"]), p["epochs_trained"]) + _num(str(p["epochs_unpruned"]), p["epochs_unpruned"])
            + _num(ratio, p["epochs_ratio"]) + "</tr>"
        )
    pruning_html = (
        "<table id=\"pruning\"><tr><th>study</th><th>pruner</th><th>complete</th><th>pruned</th><th>failed</th><th>running</th>"
        "<th>epochs trained</th><th>epochs unpruned</th><th>ratio</th></tr>" + "".join(pruning) + "</table>"
        "<p class=\"small\">Epochs unpruned: finished trials × epochs per trial, what the same trials would have cost without pruning.</p>"
        if pruning else "<p>No study of these final models is in the storage (pass <code>--storage</code>).</p>"
    )

    prov = []
    for d in summary["provenance"]:
        subset = f", stratified subset of {d['subset']:,} training images" if d["subset"] else ""
        prov.append(
            f'<tr data-study="{_e(d["study"])}"><td>{_e(d["label"])}</td><td><code>{_e(d["source"])}</code>{_e(subset)}</td>'
            f"<td><code>{_e(d['split_hash'])}</code><br><span class=\"small\">seed {_e(d['split_seed'])}, validation fraction "
            f"{_e(d['val_fraction'])}</span></td>"
            + _num(f"{d['train_images']:,}" if d["train_images"] is not None else "-", d["train_images"])
            + _num(f"{d['test_images']:,}" if d["test_images"] is not None else "-", d["test_images"])
            + f"<td>{_e(len(d['classes']))}: {_e(', '.join(d['classes']))}</td><td>{_e(d['hardware'])}<br><span class=\"small\">"
            + _e(", ".join(f"{k} {v}" for k, v in d["versions"].items())) + f"</span></td><td>{_e(d['created'])}</td></tr>"
        )
    figures = "".join(_figure(out, name, _caption(name)) for name in summary["figures"])
    notes_html = ("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cifar-hpo report: {_e(len(rows))} final model(s) against the baseline</title>
<style>{STYLE}</style></head>
<body>
<h1>Final models against the baseline</h1>
<p class="small">Written by <code>cifar-hpo report</code>; every number below is read from <code>summary.json</code> beside this file.
Test accuracy: mean and sample standard deviation over seeds, each seed retrained on train + validation and tested once on the test
split. Δ baseline: difference of the mean test accuracies in percentage points. Best val acc: the study's best trial on the
validation split.</p>
{"".join(table)}
{notes_html}
<h2>Figures</h2>
{figures}
<h2>Best parameters</h2>
{"".join(params)}
<h2>Pruning</h2>
{pruning_html}
<h2>Data and hardware</h2>
<table id="provenance"><tr><th>model</th><th>data</th><th>split hash</th><th>train + val images</th><th>test images</th><th>classes</th>
<th>hardware, libraries</th><th>created</th></tr>{"".join(prov)}</table>
</body></html>
"""


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo report``."""
    from cifar_hpo import pruners
    results: Path = args.results
    out: Path = args.out or results / "report"
    finals = find_finals(results)
    url = storage.storage_url(args.storage, results)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies, notes = load_studies([f["study"] for _, f in finals], url)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if not any(f["study"] == BASELINE for _, f in finals):
        notes.append(f"no baseline final model ({results}/{BASELINE}/{FINAL_NAME}): differences not computed; "
                     f"make it with `cifar-hpo retrain --study {BASELINE} --default-params`")  # fmt: skip
    hashes = {f["split_hash"] for _, f in finals}
    if len(hashes) > 1:
        splits = ", ".join(f"{f['study']}: {f['split_hash']}" for _, f in finals)
        notes.append(f"the final models were trained and tested on different data splits ({splits}): accuracies not comparable")

    rows = summary_rows(finals, studies)
    curves = curves_data(finals)
    per_class = per_class_data(finals)
    figures = [draw_accuracy(rows, out / "accuracy.png"), draw_curves(curves, out / "learning_curves.png"),
               draw_per_class(per_class, out / "per_class.png")]  # fmt: skip
    confusions = {}
    for _, f in finals:
        confusions[f["study"]] = confusion_data(f)
        figures.append(draw_confusion(confusions[f["study"]], out / f"confusion_{f['study']}.png"))
    study_plots: dict[str, Any] = {}
    for name, study in studies.items():
        hist, imp, inter = history_data(study), importance_data(study), intermediate_data(study)
        study_plots[name] = {"history": hist, "importance": imp, "intermediate": inter, "pruning": pruning_data(study)}
        figures.append(draw_history(hist, out / f"study_{name}_history.png"))
        if imp["importances"]:
            figures.append(draw_importance(name, imp, out / f"study_{name}_importance.png"))
        if imp["note"]:
            notes.append(f"{name}: parameter importances: {imp['note']}")
        figures.append(draw_intermediate(inter, out / f"study_{name}_intermediate.png"))
        study_plots[name]["pruning_check"] = prune = pruners.study_pruning_data(study)  # best vs epochs, rung rank correlation
        figures.append(pruners.draw_pruning(prune, out / f"study_{name}_pruning.png"))
        notes.append(pruners.pruning_line(prune))

    names = [p.name for p in figures]
    summary = {"rows": rows, "baseline": BASELINE, "notes": notes, "figures": names, "curves": curves,
               "per_class": per_class, "confusion": confusions, "studies": study_plots,
               "provenance": provenance_data(finals)}  # fmt: skip
    checkpoint.atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode(), mode=0o644)
    checkpoint.atomic_write_bytes(out / "summary.md", summary_markdown(rows, names, notes).encode(), mode=0o644)
    checkpoint.atomic_write_bytes(out / "index.html", summary_html(summary, out).encode(), mode=0o644)
    for r in rows:
        diff = "" if r["diff_points"] is None or r["study"] == BASELINE else f"  {r['diff_points']:+.2f} pts vs baseline"
        print(f"{r['label']:<40} test {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} %{diff}")
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {len(names)} figures, summary.md, summary.json and index.html (open it in a browser) to {out}")
    return 0
