"""Security: checkpoints never unpickle code, the dashboard listens on this machine only,
databases and checkpoints are readable by their owner only."""

from __future__ import annotations

import os
import pickle
import socket
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import wait_for_dashboard

from cifar_hpo import cli, storage
from cifar_hpo.errors import UserError
from cifar_hpo.storage import checkpoint


class _Planted:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "final.pt"
    payload = {"model_state": {"w": torch.zeros(2)}, "extra": _Planted(marker)}
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="cannot be loaded safely"):
        checkpoint.load(path)
    assert not marker.exists()
    # The file really is malicious: an unsafe load (in a throwaway process) runs the command.
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists()


def test_checkpoints_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: modes must come from the code, not the umask
    try:
        path = tmp_path / "sub" / "last.pt"
        checkpoint.save({"w": torch.ones(3)}, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        checkpoint.save({"w": torch.zeros(3)}, path)  # replaced, still owner-only
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_sqlite_database_and_its_wal_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        db = tmp_path / "new" / "cifar_hpo.db"
        st = storage.open_storage(f"sqlite:///{db}")
        study = optuna.create_study(storage=st, study_name="s")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
        assert db in files and len(files) >= 2  # the database and its -wal (and -shm) while open
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        os.umask(old)


def test_artifacts_such_as_best_checkpoints_are_owner_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    study = optuna.create_study(storage=storage.open_storage(url, heartbeat=False), study_name="s")
    trial = study.ask()
    ckpt = tmp_path / "trial-0-best.pt"
    checkpoint.save({"w": torch.ones(3)}, ckpt)
    old = os.umask(0)
    try:
        store = storage.artifact_store(url, tmp_path / "results")
        artifact_id = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(ckpt), study_or_trial=trial)
    finally:
        os.umask(old)
    stored = storage.artifact_dir(url, tmp_path / "results") / artifact_id
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stored.read_bytes() == ckpt.read_bytes()


def test_dashboard_binds_to_localhost_by_default() -> None:
    args = cli.build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1"
    assert cli.build_parser().parse_args(["dashboard", "--host", "0.0.0.0"]).host == "0.0.0.0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.append(address)
    return found


def _other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc/net/tcp")
def test_dashboard_server_listens_on_127_0_0_1_only(tmp_path: Path) -> None:
    port = _free_port()
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    storage.open_storage(url, heartbeat=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_hpo.cli", "dashboard", "--storage", url, "--results", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        if not wait_for_dashboard(proc, port):
            pytest.fail(f"the dashboard did not answer on 127.0.0.1: {proc.communicate()[0] if proc.poll() is not None else ''}")
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, and nothing on 0.0.0.0 or ::
        other = _other_address()
        if other is not None:
            with pytest.raises(OSError), socket.create_connection((other, port), timeout=2):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)
