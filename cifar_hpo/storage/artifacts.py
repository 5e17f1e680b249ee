"""Optuna's artifact store beside the database: learning curves and checkpoints, written atomically, mode 0600."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import make_url

from cifar_hpo.storage.refused import refusing


def artifact_dir(url: str, results: Path) -> Path:
    """The artifact store's folder: beside an SQLite file, else ``results/artifacts``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).parent / "artifacts"
    return results / "artifacts"


class _OwnerOnlyArtifactStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's file-system artifact store, writing each file atomically with mode 0600.

    Artifacts include the best trials' checkpoints; Optuna's own ``write`` creates them with the
    umask's mode (world-readable by default) and in place (a kill leaves a partial file).
    Optuna's store keeps artifact ``ID`` at ``base_path/ID`` (its reader opens exactly that;
    tests/test_optuna_compat.py reads ours back through Optuna's own store).
    """

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.folder = Path(base_path)

    def path_of(self, artifact_id: str) -> Path:
        """Where artifact ``artifact_id`` lives; an id that would leave the folder is refused."""
        path = self.folder / artifact_id
        base = os.path.abspath(self.folder)
        if os.path.isabs(artifact_id) or os.path.commonpath([base, os.path.abspath(path)]) != base:
            raise ValueError(f"Invalid artifact_id: {artifact_id}")
        return path

    def write(self, artifact_id: str, content_body: Any) -> None:
        from cifar_hpo.storage.checkpoint import atomic_write_bytes  # lazy: it imports torch, which reading a study does not need

        atomic_write_bytes(self.path_of(artifact_id), content_body.read())


def artifact_store(url: str, results: Path) -> optuna.artifacts.FileSystemArtifactStore:
    """Optuna's file-system artifact store for this storage (created if needed)."""
    folder = artifact_dir(url, results)
    with refusing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return _OwnerOnlyArtifactStore(str(folder))
