"""``cifar-hpo dashboard``: optuna-dashboard on the study storage and its artifact store.

    cifar-hpo dashboard                   # http://127.0.0.1:8080 for results/cifar_hpo.db
    cifar-hpo dashboard --storage postgresql+psycopg://user@host/db --port 8081

It only reads what runs write (trials, the study note of `dashboard_notes`,
curves and checkpoints in the artifact store), so it is safe to run beside a
study in progress; opening the database changes nothing in it (`storage.open_existing`),
and the only writes are the ones people make in its pages (a note edited). Storage
URLs are shown with the password masked.
"""

from __future__ import annotations

import argparse
import errno
import socket
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cifar_hpo import storage
from cifar_hpo.errors import UserError


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo dashboard``: optuna-dashboard on the storage and artifact store."""
    import optuna_dashboard

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port; pass one in 1-65535 (default 8080)")
    url = storage.storage_url(args.storage, args.results)
    st = storage.open_existing(url, writable=True)
    if st is None:
        missing = storage.missing_sqlite(url) or storage.mask_url(url)
        raise UserError(f"no study database at {missing}; run a study first (cifar-hpo run --study NAME) or pass --storage")
    # No folder is made for a database whose runs stored no artifacts (another tool's): nothing to show.
    store = storage.artifact_store(url, args.results) if storage.artifact_dir(url, args.results).is_dir() else None
    server = _listen(args.host, args.port, optuna_dashboard.wsgi(st, artifact_store=store))
    shown = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"optuna-dashboard on http://{shown}:{args.port} for {storage.mask_url(url)} (Ctrl-C stops it)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: the dashboard has no login; anyone who can reach this address can read and change the studies")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


class _Server(WSGIServer):
    """wsgiref's server (what optuna_dashboard.run_server starts through bottle), for IPv4 or IPv6 hosts."""

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        if ":" in address[0]:  # an IPv6 address, as bottle's wsgiref adapter tells them
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


def _listen(host: str, port: int, app: Any) -> WSGIServer:
    """The dashboard's server, listening on ``host:port``; bound here so that a bad address is one line.

    Raises:
        UserError: the port is taken, or ``host`` is no address of this machine (nothing is sent anywhere).
    """
    try:
        return make_server(host, port, app, server_class=_Server, handler_class=WSGIRequestHandler)
    except OSError as e:
        whys = {
            errno.EADDRINUSE: f"port {port} is in use by another program; pass another --port",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; pass --host 127.0.0.1, or an address it has",
            errno.EACCES: f"port {port} needs more privileges; pass a port above 1023 (default 8080)",
        }
        if isinstance(e, socket.gaierror):
            why = f"{host!r} is not a host name or address of this machine; pass --host 127.0.0.1"
        else:
            why = whys.get(e.errno or 0, "pass another --host or --port")
        raise UserError(f"dashboard cannot listen on {host}:{port} ({e.strerror}): {why}") from None
