"""The report's summary.md and its one self-contained page, index.html (figures embedded, no network, no JavaScript)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
                         ("_intermediate.png", "validation accuracy per epoch of every trial (pruned dashed)"),
                         ("_pruning.png", "best validation accuracy vs epochs consumed by all trials"),
                         ("_anytime.png", "best validation accuracy vs device time spent by all trials (star: the baseline's "
                                          "test accuracy and the cost of one of its training runs)")):  # fmt: skip
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
