"""The one matplotlib setup (`pyplot`: Agg backend, PNG files) and the drawings trials share.

report.py and explore.py draw through `pyplot` too. matplotlib is imported on
first use, so commands that draw nothing never load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend: files only, no display needed (servers, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(epochs: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Validation accuracy (and losses where known) per epoch, written to ``path``."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    xs = [e["epoch"] for e in epochs]
    ax.plot(xs, [100 * e["val_acc"] for e in epochs], "o-", color="tab:blue", label="validation accuracy")
    if epochs and "train_acc" in epochs[0]:
        ax.plot(xs, [100 * e["train_acc"] for e in epochs], "s--", color="tab:gray", label="training accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if epochs and "val_loss" in epochs[0]:
        ax2 = ax.twinx()
        ax2.plot(xs, [e["val_loss"] for e in epochs], "^:", color="tab:red", label="validation loss")
        ax2.set_ylabel("loss (cross-entropy)")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="center right", fontsize=8)
    else:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
