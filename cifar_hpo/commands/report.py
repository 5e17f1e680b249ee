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
- ``study_<study>_pruning.png``, ``study_<study>_anytime.png``: per study, the best
  validation accuracy against the epochs and against the device hours its trials spent
  (all workers and machines; complete and pruned trials marked; the baseline's one
  training run and test accuracy on the same cost axis): what more budget would buy.
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
from pathlib import Path
from typing import Any

import optuna

from cifar_hpo import storage
from cifar_hpo.errors import UserError
from cifar_hpo.models.final import FINAL_NAME
from cifar_hpo.report.data import (
    BASELINE,
    anytime_data,
    confusion_data,
    curves_data,
    find_finals,
    history_data,
    importance_data,
    intermediate_data,
    load_studies,
    per_class_data,
    provenance_data,
    pruning_data,
    pruning_line,
    study_pruning_data,
    summary_rows,
)
from cifar_hpo.report.figures import (
    draw_accuracy,
    draw_anytime,
    draw_confusion,
    draw_curves,
    draw_history,
    draw_importance,
    draw_intermediate,
    draw_per_class,
    draw_pruning,
)
from cifar_hpo.report.page import summary_html, summary_markdown
from cifar_hpo.storage import checkpoint


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo report``."""
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
    baseline = next((f for _, f in finals if f["study"] == BASELINE), None)
    for name, study in studies.items():
        hist, imp, inter = history_data(study), importance_data(study), intermediate_data(study)
        study_plots[name] = {"history": hist, "importance": imp, "intermediate": inter, "pruning": pruning_data(study)}
        figures.append(draw_history(hist, out / f"study_{name}_history.png"))
        if imp["importances"]:
            figures.append(draw_importance(name, imp, out / f"study_{name}_importance.png"))
        if imp["note"]:
            notes.append(f"{name}: parameter importances: {imp['note']}")
        figures.append(draw_intermediate(inter, out / f"study_{name}_intermediate.png"))
        study_plots[name]["pruning_check"] = prune = study_pruning_data(study)  # best vs epochs, rung rank correlation
        figures.append(draw_pruning(prune, out / f"study_{name}_pruning.png"))
        study_plots[name]["anytime"] = anytime = anytime_data(study, baseline)  # best vs device hours
        figures.append(draw_anytime(anytime, out / f"study_{name}_anytime.png"))
        notes.append(pruning_line(prune))

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
