"""``--workers N``: N worker processes on this machine, each with its share of the cores or its own GPU, supervised.

    cifar-hpo run --study fast --trials 20 --workers 2
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import optuna
import torch

from cifar_hpo import storage
from cifar_hpo.device import cpu_threads, resolve_device
from cifar_hpo.errors import UserError
from cifar_hpo.study.objective import Interrupted
from cifar_hpo.study.spec import StudySpec
from cifar_hpo.study.worker import load_data, reconnecting, sigterm_as_interrupt, work

MAX_WORKER_RESTARTS = 3  # per worker: a worker killed (OOM killer, kill -9) more often stays down


# Bounds of --workers. Each worker imports torch and holds its own copy of the data (`--workers 64`
# on 2 cores took 15 GB before any trial started). On a GPU past a few the GPU is busy anyway; on a
# CPU the workers share the cores (`_worker_entry`), and two per core is what tests/test_workers.py
# runs on purpose (three SQLite writers on two cores, the hardest case for its lock).
WORKERS_PER_GPU = 4


WORKERS_PER_CORE = 2


def check_workers(workers: int, device: str) -> None:
    """Refuse ``--workers`` this machine cannot run: before any process starts, each costs a torch import and a copy of the data.

    At most `WORKERS_PER_CORE` per CPU core this process may use (its affinity mask), or
    `WORKERS_PER_GPU` per GPU the workers spread over (every visible one, or the one ``--device
    cuda:N`` names).

    Raises:
        UserError: fewer than 1, or more than the bound (the message names it).
    """
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    target = resolve_device(device)
    if target.type == "cuda":
        gpus = torch.cuda.device_count() if target.index is None else 1
        bound, why = WORKERS_PER_GPU * gpus, f"{WORKERS_PER_GPU} per GPU, {gpus} GPU(s) for --device {device}"
    else:
        cores = cpu_threads()
        bound, why = WORKERS_PER_CORE * cores, f"{WORKERS_PER_CORE} per CPU core, {cores} core(s) for this process"
    if workers > bound:
        raise UserError(f"--workers {workers} is more than this machine runs ({why}): pass --workers {bound} or fewer")


def worker_device(requested: str, index: int, device_count: int) -> str:
    """The device of worker ``index`` (0-based) when ``--device requested`` and ``device_count`` GPUs are visible.

    ``auto`` or ``cuda`` with GPUs: round-robin, ``cuda:{index % device_count}``, so K workers on
    G GPUs share them evenly. Anything else (``cpu``, a named ``cuda:N``, no GPU) is returned
    as asked, and the worker then takes its share of the CPU cores (`_worker_entry`).
    """
    if requested in ("auto", "cuda") and device_count > 0:
        return f"cuda:{index % device_count}"
    return requested


def _worker_entry(spec: StudySpec, url: str, results: Path, options: dict[str, Any], index: int, workers: int,
                  parent: int | None = None) -> None:  # fmt: skip
    """Body of one ``--workers`` process: own device share, own sampler seed.

    Exits 0 when the study is done (or ``--timeout``), 2 after a ``UserError`` (printed), 130 when
    interrupted (its trial is then failed and re-queued by ``objective``).
    """
    # Ctrl-C reaches the whole process group; the parent turns it into exactly one SIGTERM per worker.
    # Getting SIGINT here as well would interrupt the worker while it saves and re-queues its trial.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = where = worker_device(options["device"], index, gpus)
    if device == options["device"] and hasattr(os, "sched_setaffinity"):  # no GPU of its own: a share of the cores
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // workers)
        mine = cores[(index * share) % len(cores):][:share] or cores[:share]
        os.sched_setaffinity(0, mine)  # each CPU worker gets its share of the cores
        torch.set_num_threads(cpu_threads())
        where = f"{device}, cpu cores {mine}"
    print(f"[w{index}] worker pid {os.getpid()} on {where}", flush=True)  # the pid to signal, for people and `bench faults`
    code = 0
    try:
        with sigterm_as_interrupt():
            st = storage.open_storage(url)  # once per process: every later step uses this one
            data = load_data(spec, device=device, data_dir=options["data_dir"], cache_dir=options["cache_dir"])
            prefix = f"[w{index}] "
            reconnecting(url, lambda line: print(f"{prefix}{line}", flush=True),
                         lambda: work(spec, url, results, data, st=st, prefix=prefix, timeout=options["timeout"]), st=st)  # fmt: skip
    except UserError as e:
        print(f"cifar-hpo: error: [w{index}] {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"[w{index}] interrupted; its running trial is re-queued")
        code = 130
    # Everything is committed by now; skip the interpreter teardown, which takes seconds with torch
    # loaded (measured 4 s of a 4.3 s SIGTERM exit here), time a preempted machine may not have.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent(parent: int | None) -> None:
    """Linux: SIGTERM this worker when the ``run`` process (pid ``parent``) dies, so no orphan trains unseen."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if parent is not None and os.getppid() != parent:  # it died before prctl took effect: leave at once
        os._exit(130)


def run_workers(spec: StudySpec, url: str, results: Path, *, workers: int, device: str = "auto", data_dir: Path | None = None,
                cache_dir: Path | None = None, timeout: float | None = None) -> int:  # fmt: skip
    """Start ``workers`` worker processes and supervise them until all have exited.

    Plain ``multiprocessing`` processes, not a joblib/loky pool: loky SIGKILLs every other worker
    when one dies, and SIGKILLs them all on Ctrl-C, leaving their trials as zombies; here a killed
    worker costs only its own trial (failed once its heartbeat is stale, and retried) and is
    restarted. SIGTERM or Ctrl-C is passed on as one SIGTERM per worker: each fails and re-queues its
    trial and exits; a second signal SIGKILLs them (their trials are then retried like killed ones).

    Returns:
        0 when every worker finished, else the worst exit status (2: a worker's UserError).

    Raises:
        UserError: more workers than this machine runs (`check_workers`; no process started then).
        Interrupted: after SIGTERM or Ctrl-C, once the workers have exited.
    """
    check_workers(workers, device)
    mp = multiprocessing.get_context("spawn")  # fork after torch (or CUDA) started threads is unsafe
    options = {"device": device, "data_dir": data_dir, "cache_dir": cache_dir, "timeout": timeout}

    def start(i: int) -> Any:
        proc = mp.Process(target=_worker_entry, args=(spec, url, results, options, i, workers, os.getpid()),
                          name=f"cifar-hpo-w{i}")  # fmt: skip
        proc.start()
        return proc

    procs = {i: start(i) for i in range(workers)}
    restarts = dict.fromkeys(procs, 0)
    received: list[int] = []

    def send(sig: int) -> None:
        for proc in procs.values():
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        send(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: no forwarding
            previous[sig] = signal.signal(sig, forward)
    worst = 0
    try:
        while procs:
            wait([proc.sentinel for proc in procs.values()], timeout=1.0)
            for i, proc in list(procs.items()):
                if proc.exitcode is None:
                    continue
                proc.join()
                del procs[i]
                code = proc.exitcode
                if code < 0 and not received:
                    name = signal.Signals(-code).name
                    if restarts[i] < MAX_WORKER_RESTARTS:
                        restarts[i] += 1
                        print(f"[w{i}] worker died ({name}); its trial is retried once its heartbeat is {storage.GRACE_PERIOD}s "
                              f"stale; restarting the worker ({restarts[i]}/{MAX_WORKER_RESTARTS})", flush=True)  # fmt: skip
                        procs[i] = start(i)
                        continue
                    print(f"[w{i}] worker died ({name}) {restarts[i] + 1} times; not restarted, run the same command to continue",
                          flush=True)  # fmt: skip
                if code not in (0, 130):
                    worst = max(worst, 2 if code == 2 else 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if procs:  # the parent itself failed: stop the workers the way preemption would
            send(signal.SIGTERM)
            for proc in procs.values():
                proc.join(timeout=30)
    if received:
        raise Interrupted(f"signal {received[0]}")
    return worst
