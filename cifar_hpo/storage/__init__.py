"""Storage: the study database (SQLite by default, PostgreSQL for many machines), heartbeats, artifacts, files.

    from cifar_hpo import storage
    st = storage.open_storage(storage.storage_url(None, Path("results")))

- `connection`: storage URLs, masked for printing; what a lost connection looks like.
- `sqlite`: creating and checking an SQLite file (WAL, busy timeout, BEGIN IMMEDIATE).
- `heartbeat`: the storage class whose stale trials are failed and re-queued exactly once.
- `database`: ``open_storage`` / ``open_existing``, one user-facing line for every failure.
- `record`: the trial record: every attribute a trial writes (typed), its fail kinds, one writer and one reader.
- `artifacts`: Optuna's artifact store beside the database, atomic and owner-only.
- `checkpoint`: atomic file writes and size-bounded, weights-only loads (imports torch: not re-exported).
- `refused`: writes the disk refuses (no space, read-only file system or file), each as one line that names it.
- `optuna_compat`: every private Optuna name this project relies on, each tested.

Imports go connection -> sqlite -> heartbeat -> database; storage imports no other layer of cifar_hpo.
"""

from cifar_hpo.storage.artifacts import artifact_dir, artifact_store
from cifar_hpo.storage.connection import DB_NAME, ENV_VAR, best_value, lost_connection, mask_url, ping, quiet_experimental, storage_url
from cifar_hpo.storage.database import open_existing, open_storage
from cifar_hpo.storage.heartbeat import GRACE_PERIOD, MAX_RETRY, earlier_retry, requeue_interrupted, retried_trial_number
from cifar_hpo.storage.sqlite import check_creatable, missing_sqlite, sqlite_error_text

__all__ = [
    "DB_NAME", "ENV_VAR", "GRACE_PERIOD", "MAX_RETRY", "artifact_dir", "artifact_store", "best_value", "check_creatable",
    "earlier_retry", "lost_connection", "mask_url", "missing_sqlite", "open_existing", "open_storage", "ping",
    "quiet_experimental", "requeue_interrupted", "retried_trial_number", "sqlite_error_text", "storage_url",
]  # fmt: skip
