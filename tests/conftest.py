"""Shared fixtures: synthetic ImageFolder trees and the real shared archive."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SHARED_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    pg = _postgres_reachable()
    skip_pg = pytest.mark.skip(reason="PostgreSQL at 127.0.0.1:5432 not reachable")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "postgres" in item.keywords and not pg:
            item.add_marker(skip_pg)


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "frog"), n_train: int = 20,
                      n_test: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Write a small ImageFolder tree of PNGs whose class is visible in the colour.

    Each class has its own mean colour plus noise, so a model can learn it.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[ci % 3] = 200
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class ImageFolder tree (20 train, 6 test images per class)."""
    return make_image_folder(tmp_path / "imgs")


@pytest.fixture
def shared_archive() -> Path:
    """The real CIFAR-10 JPEG archive from ../shared, or skip."""
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"real data not present at {SHARED_ARCHIVE}")
    return SHARED_ARCHIVE


def study_toml(*, name: str | None = None, epochs: int = 2, trials: int = 2, pruner: str = "none") -> str:
    """A tiny baseline_cnn study file: random sampler, the given pruner (rungs from epoch 1)."""
    head = f'name = "{name}"\n' if name else ""
    return head + (
        'model = "baseline_cnn"\nsearch_space = "baseline"\n'
        f"epochs = {epochs}\ntrials = {trials}\nseed = 0\n"
        '[sampler]\nkind = "random"\n'
        f'[pruner]\nkind = "{pruner}"\nmin_resource = 1\nreduction_factor = 2\nn_startup_trials = 2\nn_warmup_steps = 1\n'
    )


def retrained_demo(root: Path, *, n_train: int, n_test: int) -> SimpleNamespace:
    """A final.pt: ``retrain --default-params`` of a 1-epoch baseline_cnn study "demo" on a small synthetic folder.

    Returns root, folder (the images), results, final (its final.pt) and image (one test image).
    """
    from cifar_hpo import cli

    folder = make_image_folder(root / "imgs", n_train=n_train, n_test=n_test)
    (root / "demo.toml").write_text(study_toml(epochs=1, trials=1))
    results = root / "res"
    code = cli.main(["retrain", "--study", str(root / "demo.toml"), "--default-params", "--data", str(folder),
                     "--storage", f"sqlite:///{root}/absent.db", "--results", str(results), "--cache-dir", str(root / "cache"),
                     "--device", "cpu"])  # fmt: skip
    assert code == 0
    return SimpleNamespace(root=root, folder=folder, results=results, final=results / "demo" / "final.pt",
                           image=next((folder / "test").rglob("*.png")))  # fmt: skip


def wait_for_dashboard(proc: subprocess.Popen, port: int, tries: int = 120) -> bool:
    """Poll the dashboard's study list every 0.5 s until it answers 200 (True), or it exits / tries run out (False)."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            if proc.poll() is not None:
                return False
            time.sleep(0.5)
    return False
