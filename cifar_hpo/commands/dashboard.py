"""``cifar-hpo dashboard``: optuna-dashboard on the study storage and its artifact store.

    cifar-hpo dashboard                   # http://127.0.0.1:8080 for results/cifar_hpo.db
    cifar-hpo dashboard --storage postgresql://user@host/db --port 8081

It only reads what runs write (trials, the study note of `dashboard_notes`,
curves and checkpoints in the artifact store), so it is safe to run beside a
study in progress. Storage URLs are shown with the password masked.
"""

from __future__ import annotations

import argparse

from cifar_hpo import storage
from cifar_hpo.errors import UserError


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo dashboard``: optuna-dashboard on the storage and artifact store."""
    import optuna_dashboard

    url = storage.storage_url(args.storage, args.results)
    st = storage.open_existing(url)
    if st is None:
        missing = storage.missing_sqlite(url)
        raise UserError(f"no study database at {missing}; run a study first (cifar-hpo run --study NAME) or pass --storage")
    store = storage.artifact_store(url, args.results)
    print(f"optuna-dashboard on http://{args.host}:{args.port} for {storage.mask_url(url)} (Ctrl-C stops it)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: the dashboard has no login; anyone who can reach this address can read and change the studies")
    optuna_dashboard.run_server(st, host=args.host, port=args.port, artifact_store=store)
    return 0
