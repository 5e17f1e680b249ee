"""``cifar-hpo explore`` writes its figures and counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifar_hpo import cli
from cifar_hpo.commands import explore

PNG = b"\x89PNG\r\n\x1a\n"


def test_explore_writes_files(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["explore", "--data", str(image_folder), "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert cli.main([*argv, "--per-class", "4"]) == 0
    for name in ("samples.png", "augmentations.png", "class_counts.png"):
        assert (out / name).read_bytes()[:8] == PNG
    counts = json.loads((out / "counts.json").read_text())
    assert counts["classes"] == ["cat", "dog", "frog"]
    assert counts["train"] == {"cat": 18, "dog": 18, "frog": 18}
    assert counts["val"] == {"cat": 2, "dog": 2, "frog": 2}
    assert counts["test"] == {"cat": 6, "dog": 6, "frog": 6}
    printed = capsys.readouterr().out
    assert str(out / "samples.png") in printed and "split" in printed


def test_sample_indices_per_class() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    picks = explore.sample_indices(labels, 3, per_class=5, seed=0)
    assert picks.shape == (3, 2)  # limited by the smallest class
    for c in range(3):
        assert (labels[picks[c]] == c).all()
    np.testing.assert_array_equal(picks, explore.sample_indices(labels, 3, per_class=5, seed=0))
