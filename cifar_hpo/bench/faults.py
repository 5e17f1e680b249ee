"""``cifar-hpo bench faults``: SIGKILL workers during a real study, then count what survived.

    cifar-hpo bench faults --json                                   # temp SQLite, 2 workers, 12 trials, 3 kills
    cifar-hpo bench faults --workers 3 --kills 5 --repeat 20 --json # 20 studies, seeds 0-19, and the totals
    CIFAR_HPO_STORAGE=postgresql://postgres:pw@127.0.0.1/test cifar-hpo bench faults --restart-db --json

It runs ``cifar-hpo run --workers K`` in a subprocess on tiny synthetic images
(``baseline_cnn``, a few epochs per trial) with a 1 s heartbeat, a 3 s grace
period and a snapshot after every epoch, and SIGKILLs a random training worker
at random times, ``--kills`` times. The run restarts killed workers; if it
exits before the study is done, the bench runs the same command again (as a
person would). ``--restart-db`` also restarts the local PostgreSQL server once
in the middle. Then it reads the database and counts:

    trials_finished   complete + pruned trials at the end (must equal --trials)
    trials_lost       finished trials that later disappeared, plus killed configurations
                      (a trial and its retries: a lineage) that had started training and
                      never finished, their last kill never retried (must be 0)
    retries_exhausted killed lineages given up after MAX_RETRY (2) kills: by design,
                      a fresh trial takes the slot
    killed_unstarted  killed trials of a lineage that never started training: killed
                      before the check that found them beyond --trials (their retry,
                      if any, stood down as surplus); nothing was lost
    zombies_left      trials still RUNNING after the last run exited (must be 0)
    waiting_left      trials still WAITING after the last run exited (must be 0)
    retried_twice     lineages in which one kill was followed by two runs (must be 0)
    duplicate_runs    trial numbers trained by two workers (must be 0)

``--repeat N`` runs N such studies (seeds seed..seed+N-1) and reports each
run's counts and their totals; it exits 1 if any run lost a trial, left one
RUNNING or WAITING, trained one twice, stalled, or finished other than --trials.

The storage URL goes to the subprocess through ``$CIFAR_HPO_STORAGE``, never on
a command line, where other users of the machine could read its password. A
study on a server is named ``faults-<random>`` and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_hpo import bench, storage
from cifar_hpo.errors import UserError
from cifar_hpo.storage import heartbeat, record

# Fast fault detection: a killed worker's trial is failed and re-queued 3 s after its last heartbeat
# (20 s when it never had one: one machine, one clock, so no margin for clock skew is needed).
FAULT_ENV = {"CIFAR_HPO_HEARTBEAT": "1", "CIFAR_HPO_GRACE": "3", "CIFAR_HPO_ORPHAN_S": "20", "CIFAR_HPO_SNAPSHOT_S": "0"}
MAX_RUNS = 6  # the command is run again at most this many times until the study is done
STALL_S = 120.0  # a run that prints nothing for this long is stuck (e.g. waiting on a trial left RUNNING)
CLASSES = ("airplane", "cat", "frog", "ship")

STUDY_TOML = """\
name = "{name}"
description = "cifar-hpo bench faults: tiny trials on synthetic images"
model = "baseline_cnn"
search_space = "baseline"
epochs = {epochs}
trials = {trials}
seed = {seed}
[sampler]
kind = "random"
[pruner]
kind = "none"
"""

_PID = re.compile(r"^\[w(\d+)\] worker pid (\d+)")
_EPOCH = re.compile(r"^\[w(\d+)\] trial \d+/\d+ \(#(\d+)\) epoch")


def synthetic_images(root: Path, *, per_class: int = 24, seed: int = 0) -> Path:
    """A small ImageFolder tree (train/ and test/) whose class shows in the colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 4)):
        for ci, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[ci % 3] = 90 + 110 * (ci // 3)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


@dataclass
class _Watch:
    """What the bench learns from one run's output, read on a thread."""

    lines: list[str] = field(default_factory=list)
    pids: dict[int, int] = field(default_factory=dict)  # worker index -> current pid
    training: set[int] = field(default_factory=set)  # worker indices in a trial since their current pid started
    trained_by: dict[int, set[int]] = field(default_factory=dict)  # trial number -> worker indices that trained it
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, stream: Any, echo: bool) -> None:
        for line in stream:
            with self.lock:
                self.lines.append(line)
                if m := _PID.match(line):
                    self.pids[int(m[1])] = int(m[2])
                    self.training.discard(int(m[1]))
                elif m := _EPOCH.match(line):
                    self.training.add(int(m[1]))
                    self.trained_by.setdefault(int(m[2]), set()).add(int(m[1]))
            if echo:
                print(f"    | {line}", end="", flush=True)


def _restart_postgres() -> str:
    """Restart the local PostgreSQL cluster and wait until it accepts connections again."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        return "skipped (no local pg_ctlcluster)"
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    _wait_postgres_up()
    return "restarted" if done.returncode == 0 else f"restart failed ({done.stderr.strip()[:120]})"


def _wait_postgres_up(timeout: float = 60) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", 5432), timeout=1):
                if shutil.which("pg_isready") is None or subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode == 0:
                    return
        except OSError:
            pass
        time.sleep(0.5)


class _Finished:
    """Reads the numbers of the study's finished trials; an empty set while unreadable."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.study: Any = None
        self.missing = True  # the last read found no such study (not created yet)

    def __call__(self) -> set[int]:
        try:
            if self.study is None:
                self.study = optuna.load_study(study_name=self.name, storage=storage.open_storage(self.url, heartbeat=False))
            self.missing = False
            states = (TrialState.COMPLETE, TrialState.PRUNED)
            return {t.number for t in self.study.get_trials(deepcopy=False, states=states)}
        except KeyError:  # not created yet
            self.missing = True
            return set()
        except Exception:  # the server is restarting: ask again later
            self.study = None
            return set()


def _exit_on_sigterm() -> Any:
    """SIGTERM to the bench (``timeout``, a job scheduler) unwinds it, so the study it runs is stopped too."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def account(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """What became of the killed trials of a study, lineage by lineage (a trial and its retries).

    Killed: failed by a stale heartbeat (a kill, or a worker cut off from the database), reason
    "stale: ..." or none (from before that reason was recorded). Each kill must be followed by exactly
    one trial of its lineage that ran (a retry that stood down as surplus ran nothing), unless the
    lineage was killed ``MAX_RETRY`` times (given up by design: a fresh trial takes its slot) or never
    started training (killed before the check that found it beyond the target).

    Returns:
        trials_killed, retries (trials that ran after a kill), retried_twice (lineages in which a kill
        was followed by two runs), retries_exhausted, killed_unstarted, never_retried (lineages that
        trained, never finished, and whose last kill was never followed: a lost configuration).
    """
    records = {t.number: record.read(t) for t in trials}
    lineages: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        lineages.setdefault(heartbeat.lineage(t), []).append(t)

    def killed(t: optuna.trial.FrozenTrial) -> bool:
        return t.state == TrialState.FAIL and records[t.number].fail_kind in (record.FailKind.STALE, None)

    counts = dict.fromkeys(("trials_killed", "retries", "retried_twice", "retries_exhausted", "killed_unstarted", "never_retried"), 0)
    for members in lineages.values():
        kills = [t for t in members if killed(t)]
        if not kills:
            continue
        ran = [t for t in members if t.state != TrialState.WAITING and records[t.number].fail_kind is not record.FailKind.SURPLUS]
        counts["trials_killed"] += len(kills)
        counts["retries"] += len(ran) - 1
        if all(records[t.number].trial_params is None for t in members):  # a retry copies its original's
            counts["killed_unstarted"] += len(kills)
            continue
        counts["retried_twice"] += len(ran) > len(kills) + 1
        done = any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in members)
        if not done and killed(ran[-1]):  # nothing ran after the last kill
            # Retrying stops after MAX_RETRY kills of one lineage (a trial that keeps killing its worker
            # should not run for ever).
            exhausted = len(ran[-1].system_attrs.get("retry_history") or []) + 1 > storage.MAX_RETRY
            counts["retries_exhausted" if exhausted else "never_retried"] += 1
    return counts


def measure(
    workdir: Path,
    *,
    url: str | None = None,
    trials: int = 12,
    workers: int = 2,
    kills: int = 3,
    epochs: int = 6,
    seed: int = 0,
    restart_db: bool = False,
    echo: bool = False,
    timeout_s: float = 1200.0,
) -> dict[str, Any]:
    """Run the faulted study in ``workdir``; return the counts (see the module docstring).

    The study is left in its storage (a test inspects it); ``main`` deletes a server-side one.
    """
    rng = random.Random(seed)
    name = f"faults-{uuid.uuid4().hex[:8]}"
    url = url or f"sqlite:///{(workdir / 'faults.db').as_posix()}"
    images = synthetic_images(workdir / "images", seed=seed)
    study_file = workdir / f"{name}.toml"
    study_file.write_text(STUDY_TOML.format(name=name, epochs=epochs, trials=trials, seed=seed))
    cmd = [sys.executable, "-m", "cifar_hpo.cli", "run", "--study", str(study_file), "--trials", str(trials),
           "--workers", str(workers), "--device", "cpu", "--data", str(images), "--results", str(workdir / "results"),
           "--cache-dir", str(workdir / "cache")]  # fmt: skip
    env = {**os.environ, **FAULT_ENV, storage.ENV_VAR: url}  # the URL (and its password) stays off the command line
    is_postgres = url.startswith("postgres")
    restart_pending = restart_db and is_postgres
    db_restart = "not asked" if not restart_db else ("pending" if is_postgres else "skipped (not PostgreSQL)")
    finished_now = _Finished(url, name)
    kill_log: list[tuple[float, int]] = []
    seen_finished: set[int] = set()
    watches: list[_Watch] = []
    exit_codes: list[int] = []
    stalled = False
    started = time.time()
    previous = _exit_on_sigterm()
    while not stalled and len(exit_codes) < MAX_RUNS and time.time() - started < timeout_s:
        watch = _Watch()
        watches.append(watch)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        reader = threading.Thread(target=watch.read, args=(proc.stdout, echo), daemon=True)
        reader.start()
        quiet_since, printed = time.time(), 0
        try:
            while proc.poll() is None and time.time() - started < timeout_s:
                if len(watch.lines) != printed:
                    quiet_since, printed = time.time(), len(watch.lines)
                elif time.time() - quiet_since > STALL_S:
                    stalled = True
                    break
                seen_finished |= finished_now()
                with watch.lock:
                    busy = sorted(watch.training)
                if len(kill_log) < kills and busy:
                    time.sleep(rng.uniform(0.1, 1.5))  # a random moment of a random training worker
                    index = rng.choice(busy)
                    with watch.lock:
                        pid = watch.pids.get(index)
                        watch.training.discard(index)
                    if pid is not None and proc.poll() is None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            kill_log.append((time.time() - started, pid))
                        except ProcessLookupError:
                            pass
                    if restart_pending:  # once, while the workers are busy
                        restart_pending = False
                        db_restart = _restart_postgres()
                else:
                    time.sleep(1.0)
        finally:
            if proc.poll() is None:  # the bench's own time limit: stop it the way preemption would
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(timeout=10)
        exit_codes.append(proc.returncode)
        now = finished_now()
        if finished_now.missing:  # it failed before it created the study (a bad study file, data, code): running it again won't help
            break
        seen_finished |= now
        if len(now) >= trials:
            break  # done (if before every kill could land, the figures say how many did)
        if time.time() - started >= timeout_s:
            stalled = True  # out of time
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    if exit_codes and finished_now.missing:
        last = next((line.strip() for line in reversed(watches[-1].lines) if line.strip()), "no output")
        raise UserError(f"`cifar-hpo run` exited {exit_codes[-1]} before it created the study: {last}")
    if is_postgres:
        _wait_postgres_up()
    study = optuna.load_study(study_name=name, storage=storage.open_storage(url, heartbeat=False))
    all_trials = study.get_trials(deepcopy=False)
    finished = {t.number for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    records = {t.number: record.read(t) for t in all_trials}
    fate = account(all_trials)
    trained_by: dict[int, set[int]] = {}
    for w in watches:
        for number, who in w.trained_by.items():
            trained_by.setdefault(number, set()).update(who)
    output = "".join(line for w in watches for line in w.lines)
    return {
        "kills_injected": len(kill_log),
        "trials_target": trials,
        "trials_finished": len(finished),
        "trials_lost": len(seen_finished - finished) + fate.pop("never_retried"),
        "zombies_left": sum(t.state == TrialState.RUNNING for t in all_trials),
        "waiting_left": sum(t.state == TrialState.WAITING for t in all_trials),
        **fate,
        "resumed_from_snapshot": sum(r.resumed_from_epoch is not None for r in records.values()),
        "duplicate_runs": sum(len(who) > 1 for who in trained_by.values()),
        "locked_errors": output.count("database is locked"),
        "runs": len(exit_codes),
        "stalled": int(stalled),
        "exit_codes": " ".join(map(str, exit_codes)),
        "db_restart": db_restart,
        "workers": workers,
        "epochs": epochs,
        "wall_s": round(time.time() - started, 1),
        "storage": storage.mask_url(url),
        "study": name,
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores" + (f", {platform.processor()}" if platform.processor() else ""),
    }


# Summed over the runs of --repeat; each must be 0 in every run.
TOTALS = ("trials_lost", "zombies_left", "waiting_left", "duplicate_runs", "retried_twice", "stalled")
FAULT_COUNTS = ("kills_injected", "trials_killed", "retries", "retries_exhausted", "killed_unstarted")  # also summed


def faulty(result: dict[str, Any]) -> bool:
    """Whether one run lost a trial, left one RUNNING or WAITING, trained one twice, stalled, or missed the target."""
    return bool(any(result[key] for key in TOTALS) or result["trials_finished"] != result["trials_target"])


def totals(results: list[dict[str, Any]], first_seed: int) -> dict[str, Any]:
    """The ``--repeat`` report: the sums of `TOTALS` and of the faults injected, then each run's counts."""
    return {
        "repeat": len(results),
        "seeds": f"{first_seed}-{first_seed + len(results) - 1}",
        **{key: sum(r[key] for r in results) for key in TOTALS},
        "runs_off_target": sum(r["trials_finished"] != r["trials_target"] for r in results),
        "runs_faulty": sum(faulty(r) for r in results),
        **{key: sum(r[key] for r in results) for key in FAULT_COUNTS},
        "wall_s": round(sum(r["wall_s"] for r in results), 1),
        "per_run": results,
    }


def _one_run(url: str | None, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """`measure` in a temporary folder; a study on a server is deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="cifar-hpo-faults-") as tmp:
        result = measure(Path(tmp), url=url, trials=args.trials, workers=args.workers, kills=args.kills, epochs=args.epochs,
                         seed=seed, restart_db=args.restart_db, echo=args.verbose)  # fmt: skip
        if url is not None:  # a study on a server outlives the temp folder: remove it
            try:
                optuna.delete_study(study_name=result["study"], storage=storage.open_storage(url, heartbeat=False))
            except KeyError:
                pass
    return result


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo bench faults``: print the counts (``--repeat``: of every run, and their totals); exit 1 if a run was `faulty`."""
    if args.workers < 1 or args.trials < 1 or args.kills < 0 or args.repeat < 1:
        raise UserError("--workers, --trials and --repeat must be >= 1 and --kills >= 0")
    url = args.storage or os.environ.get(storage.ENV_VAR) or None  # else a temporary SQLite database
    if url is not None:
        storage.open_storage(url, heartbeat=False)  # fail fast, with the password masked
    if args.repeat == 1:
        result = _one_run(url, args.seed, args)
        bench.emit(result, args.json)
        return 1 if faulty(result) else 0
    results = []
    for seed in range(args.seed, args.seed + args.repeat):
        results.append(_one_run(url, seed, args))
        r = results[-1]
        print(f"run {len(results)}/{args.repeat} (seed {seed}): {r['trials_finished']}/{r['trials_target']} finished, "
              f"{r['trials_lost']} lost, {r['zombies_left']} RUNNING and {r['waiting_left']} WAITING left, "
              f"{r['duplicate_runs']} trained twice, {r['kills_injected']} kills, {r['wall_s']:g}s"
              + (" FAULTY" if faulty(r) else ""), flush=True)  # fmt: skip
    report = totals(results, args.seed)
    bench.emit({k: v for k, v in report.items() if k != "per_run"}, False)  # the runs are the lines above
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 1 if report["runs_faulty"] else 0
