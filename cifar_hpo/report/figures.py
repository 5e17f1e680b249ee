"""Report figures: each ``draw_*`` takes the plain data of `cifar_hpo.report.data` and writes one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cifar_hpo.plots import pyplot as _plt  # the one matplotlib setup
from cifar_hpo.report.data import BASELINE


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


def _best_so_far(ax: Any, points: list[dict[str, Any]], x: str, counts: dict[str, Any]) -> None:
    """The best value so far as a step line over ``x``; complete and pruned trials marked where they ended."""
    pts = [p for p in points if p["best"] is not None]
    ax.step([p[x] for p in pts], [100 * p["best"] for p in pts], where="post", color="tab:blue", label="best so far")
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:red")):
        sel = [p for p in pts if p["state"] == state]
        ax.plot([p[x] for p in sel], [100 * p["best"] for p in sel], marker, color=color, ls="none",
                label=f"{state} trial ({counts[state]})")  # fmt: skip
    ax.set_ylabel("best validation accuracy (%)")
    ax.grid(alpha=0.3)


def draw_pruning(data: dict[str, Any], path: Any) -> Any:
    """Best validation accuracy vs epochs consumed; pruned trials marked where they stopped."""
    plt = _plt()

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    _best_so_far(ax, data["points"], "epochs", data)
    ax.set_xlabel("epochs consumed (all trials)")
    ax.set_title(f"{data['study']}: best found vs epochs")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _time_unit(hours: float) -> tuple[float, str]:
    """A scale and unit name that shows ``hours`` as a readable number (seconds, minutes or hours)."""
    if hours >= 2:
        return 1.0, "h"
    return (60.0, "min") if hours * 60 >= 2 else (3600.0, "s")


def draw_anytime(data: dict[str, Any], path: Path) -> Path:
    """Best validation accuracy vs device time spent (`anytime_data`); the baseline's cost and test accuracy marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    scale, unit = _time_unit(data["device_hours"])
    points = [{**p, "device_time": p["device_hours"] * scale} for p in data["points"]]
    _best_so_far(ax, points, "device_time", data)
    base = data.get("baseline")
    if base is not None:
        ax.axhline(100 * base["test_acc"], color="gray", ls="--", lw=1)
        ax.plot([base["device_hours"] * scale], [100 * base["test_acc"]], "*", color="gray", ms=10,
                label=f"baseline: test accuracy, one training run ({base['device_hours'] * scale:.3g} {unit})")  # fmt: skip
    ax.set_xlabel(f"device time spent ({unit}; all trials, all workers)")
    ax.set_title(f"{data['study']}: best found vs compute ({data['device_hours'] * scale:.3g} device {unit})")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
