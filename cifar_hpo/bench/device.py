"""``cifar-hpo bench device``: one command that runs every CUDA path of the project on this machine's accelerator.

    cifar-hpo bench device --data ../shared/data/cifar10-jpeg.tar.gz --out results/device --json

Each step is a subprocess with its own time limit, its output (stdout and stderr) in
``OUT/<step>.log``; the last line of a ``--json`` step is parsed, and a failed step
never stops the next. Without CUDA the same steps run in short CPU versions and
the first line says so. The record: ``OUT/device.json`` (per step: command, exit
code, seconds, verdict, the parsed JSON or the last lines of the output, or why
it was skipped) and ``OUT/device.md`` (a table of the steps and the device card:
torch and CUDA versions, each GPU's name and memory, the CPU's flags and cores,
the versions of the libraries the steps need). Exit status 0 when every step that
ran passed, else 1.

| step | on a GPU (`--device cuda`) | on a CPU (`--device cpu`) |
|---|---|---|
| tests | `python -m pytest -m gpu tests` (checkout only) | the same; the cuda cases skip |
| train | `bench train`: every model, fp32 and bf16, 10 steps of 256 | baseline_cnn and fast_cnn, 1 step of 16 |
| data | `bench data --seconds 3` | `--seconds 1` |
| time-to-accuracy | `--target 0.94`: 10 epochs of the full network at batch 1024 | `--target 0.70`: 2 light epochs |
| study | `run --study densenet --trials 3 --epochs 3 --subset 5000 --set pretrained=false --budget 90s` | (below) |

On a CPU the study is `run --study fast_light --trials 2 --epochs 1 --subset 2000 --budget 2m`.

The study runs in a temporary storage and results folder (ImageNet weights cannot be
downloaded where there is no network, hence ``pretrained=false``). The
time-to-accuracy step passes when it ran to the end: 0.94 is not reachable on the
shared JPEG images (README, "Time to accuracy on a CPU"), so on a GPU it reports
``reached: false`` and exits 1 by design.

GPU time, estimated (no GPU was available to this work; `GPU_LIMITS` are the limits,
which sum to 7.7 minutes, so the whole run fits in 8). The CPU figures are README's
("Measured", "Time to accuracy"); the H200's published bf16 dense throughput is
about 990 TFLOP/s (790 measured on such a machine in a matrix product), 4.8 TB/s of
memory bandwidth:

- time-to-accuracy: fast_cnn's full network is ~0.24 GFLOP per image forward, ~0.7
  with the backward pass; the 2-core AMX CPU trains 950 to 1,091 img/s (~0.7 TFLOP/s).
  Uncompiled at batch 1024 its small convolutions and BatchNorm are bound by memory and
  kernel launches: at 5% of the H200's peak (~50 TFLOP/s) that is ~60,000 img/s, 10
  epochs of 50,000 images in ~8 s, plus CUDA start, cuDNN autotuning, the 6-pass
  test-time augmentation and the three TTA levels: ~30 to 45 s (limit 90 s).
- study: densenet121 is ~5.7 GFLOP per image forward at 224 px, so ~5.6 per training
  image (forward and backward) at the search space's largest input, 128 px; bound by
  kernel launches (~1,500 per step, 20 to 30 ms a step at batch 64 to 256) at ~2,500 to
  9,000 img/s, 3 epochs of 4,500 images take 2 to 6 s per trial; 3 trials with start-up,
  cuDNN autotuning per input size and evaluation: ~45 to 90 s (limit 140 s; the 90 s
  budget counts trial seconds only).
- tests: the cuda cases of tests/test_gpu.py (every model in both precisions, an
  inductor compile of one tiny model ~20 to 40 s, resume, export with ONNX, two
  workers in subprocesses ~30 to 40 s) and test_augment's: ~100 s (limit 150 s).
- train: 5 models x 2 precisions x 13 steps of 256; the largest, densenet121 with the
  CIFAR stem at 32 px, is ~1.9 GFLOP per image forward, ~1.4 TFLOP per training step, ~37
  TFLOP in all: a few seconds of GPU work, ~20 s with imports and CUDA start (limit 40 s).
- data: decoding the archive once (7.5 s on 2 cores; cached afterwards), 2 x 3 s of
  measuring, unpacking the archive for the reference loader: ~25 s (limit 40 s).

Expected in all: ~4 to 5 minutes.

Measured on this project's 2-core CPU (AMD EPYC, AVX-512, no AMX; no GPU), other jobs
running beside it (load average 1.5 to 3.5): 2 min 20 s in all, every step passed (tests
4.6 s, train 4.0 s, data 11.9 s, time-to-accuracy 98.0 s reaching 76.1%, study 19.2 s).
At a load average of 7 the time-to-accuracy step alone took 250 to 270 s (8x slower per
image) and stopped at its 240 s limit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cifar_hpo.bench import emit
from cifar_hpo.device import SPEED_FLAGS, cpu_info, cpu_threads, speed_flags

# --data when none is given: the shared archive beside the checkout, or a copy inside it
# (a checkout's own shared/ travels with it to another machine; the folder beside it does not).
DATA_CANDIDATES = ("../shared/data/cifar10-jpeg.tar.gz", "shared/data/cifar10-jpeg.tar.gz")
GPU_BUDGET_S = 8 * 60  # the whole GPU run, every step's limit together (module docstring)
# Seconds per step (module docstring: the GPU estimates, the CPU measurements). The CPU limits
# leave room for a 2-core machine that other jobs share.
GPU_LIMITS = {"tests": 150.0, "train": 40.0, "data": 40.0, "time-to-accuracy": 90.0, "study": 140.0}
CPU_LIMITS = {"tests": 120.0, "train": 60.0, "data": 60.0, "time-to-accuracy": 240.0, "study": 120.0}
KILL_GRACE_S = 5.0  # after a step's limit: SIGTERM to its process group, then SIGKILL after this
TAIL_LINES = 20  # lines of a step's output kept in device.json when it has no JSON, or failed
PACKAGES = ("torch", "torchvision", "optuna", "optuna-dashboard", "sqlalchemy", "numpy", "pillow", "matplotlib",
            "onnx", "onnxscript", "onnxruntime", "pytest")  # fmt: skip
_PYTEST_COUNT = re.compile(r"\b\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b")
_STUDY_LINE = re.compile(r"^study '.*': (\d+) complete, (\d+) pruned, (\d+) failed; (.*)$")

Verdict = tuple[bool, str]  # passed?, the result in one line
Judge = Callable[[int, dict[str, Any] | None, list[str]], Verdict]


@dataclass(frozen=True)
class Step:
    """One subprocess of the check.

    Attributes:
        name: short name, also of its log file (``<name>.log``).
        argv: what runs after the Python interpreter (``-m pytest ...``, ``-m cifar_hpo.cli ...``).
        shown: the command as a person types it.
        limit_s: seconds before it is stopped.
        judge: (exit code, parsed JSON or None, output lines) -> (passed, one-line result).
        gpu_part: on a CPU, the part of the GPU run this step's short version leaves out.
        cwd: where it runs (None: here).
        json: whether its last line is a JSON object to parse.
        skip: why it is not run (None: it runs).
    """

    name: str
    argv: tuple[str, ...]
    shown: str
    limit_s: float
    judge: Judge
    gpu_part: str = ""
    cwd: Path | None = None
    json: bool = True
    skip: str | None = None


@dataclass
class Outcome:
    """What one step did (a row of device.json)."""

    name: str
    command: str
    argv: list[str]
    limit_s: float
    status: str  # passed, failed, timed out, skipped
    result: str = ""  # the verdict's one line, or why it was skipped
    exit_code: int | None = None
    seconds: float = 0.0
    log: str = ""
    json: dict[str, Any] | None = None
    tail: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the plan


def default_data(given: str | None) -> str:
    """``--data``: as given (an existing path made absolute), else the first of `DATA_CANDIDATES` that exists, else ``cifar10``."""
    if given is None:
        given = next((c for c in DATA_CANDIDATES if Path(c).exists()), "cifar10")
    path = Path(given).expanduser()
    return str(path.resolve()) if path.exists() else given


def checkout() -> Path | None:
    """The source checkout this package runs from (it has tests/ and pyproject.toml), or None when installed."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "tests").is_dir() else None


def plan(cuda: bool, data: str, scratch: Path, root: Path | None) -> list[Step]:
    """The steps: their GPU versions when ``cuda``, else their short CPU versions (module docstring's table).

    Args:
        cuda: run on ``cuda`` (else ``cpu``).
        data: the ``--data`` source for the data, time-to-accuracy and study steps.
        scratch: a temporary folder for the study's storage and results.
        root: the checkout whose tests run (None: the tests step is skipped).
    """
    dev = "cuda" if cuda else "cpu"
    limits = GPU_LIMITS if cuda else CPU_LIMITS
    tests = ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests")
    train = ("--models", "baseline_cnn,fast_cnn", "--steps", "1", "--batch-size", "16") if not cuda else ()
    tta = ("--target", "0.94") if cuda else ("--target", "0.70")
    study: tuple[str, ...] = (
        ("--study", "densenet", "--trials", "3", "--epochs", "3", "--subset", "5000", "--set", "pretrained=false", "--budget", "90s")
        if cuda else ("--study", "fast_light", "--trials", "2", "--epochs", "1", "--subset", "2000", "--budget", "2m")
    )  # fmt: skip
    study += ("--storage", f"sqlite:///{scratch / 'study.db'}", "--results", str(scratch / "results"))

    def cli(name: str, words: tuple[str, ...], judge: Judge, gpu_part: str, *, json_last: bool = True) -> Step:
        argv = ("-m", "cifar_hpo.cli", *words, "--device", dev, *(("--json",) if json_last else ()))
        return Step(name, argv, " ".join(("cifar-hpo", *argv[2:])), limits[name], judge, gpu_part, json=json_last)

    return [
        Step("tests", tests, "python " + " ".join(tests), limits["tests"], _judge_tests, "the cuda test cases", cwd=root,
             json=False, skip=None if root else "no tests folder: cifar_hpo runs from an installed package, not a checkout"),
        cli("train", ("bench", "train", *train), _judge_train, "every model's training speed at batch 256 on cuda"),
        cli("data", ("bench", "data", "--data", data, "--seconds", "3" if cuda else "1"), _judge_data, "batches on cuda"),
        cli("time-to-accuracy", ("bench", "time-to-accuracy", "--data", data, *tta), _judge_tta,
            "time-to-accuracy --target 0.94 on cuda"),
        cli("study", ("run", *study, "--data", data), _judge_study, "the densenet study on cuda", json_last=False),
    ]  # fmt: skip


# ---------------------------------------------------------------- verdicts


def _judge_tests(code: int, parsed: dict[str, Any] | None, lines: list[str]) -> Verdict:
    """pytest: exit 0; the result is its count line ("3 passed, 40 skipped, 600 deselected in 12.1s")."""
    counts = next((line.strip(" =") for line in reversed(lines) if _PYTEST_COUNT.search(line)), "")
    return code == 0, counts or f"exit {code}"


def _judge_train(code: int, parsed: dict[str, Any] | None, lines: list[str]) -> Verdict:
    """bench train: exit 0; img/s per model and precision."""
    if parsed is None:
        return False, _last(lines, code)
    per = parsed.get("img_s", {})
    shown = "; ".join(f"{m} " + " / ".join(f"{p} {v:,.0f}" for p, v in by.items()) for m, by in per.items())
    return code == 0, f"img/s: {shown}"


def _judge_data(code: int, parsed: dict[str, Any] | None, lines: list[str]) -> Verdict:
    """bench data: exit 0; ours and the reference loader's img/s."""
    if parsed is None:
        return False, _last(lines, code)
    ours, ref = parsed.get("ours_img_s", 0.0), parsed.get("reference_img_s", 0.0)
    return code == 0, f"ours {ours:,.0f} img/s, reference {ref:,.0f} img/s, ratio {parsed.get('ratio', 0.0):.1f}x"


def _judge_tta(code: int, parsed: dict[str, Any] | None, lines: list[str]) -> Verdict:
    """bench time-to-accuracy: ran to the end (exit 1 is a missed target, expected at 0.94 on the JPEG images)."""
    if parsed is None:
        return False, _last(lines, code)
    reached = bool(parsed.get("reached"))
    shown = (f"test acc {parsed.get('test_acc', 0.0):.4f} after {parsed.get('epochs', 0):g} epochs in "
             f"{parsed.get('seconds', 0.0):.1f} s ({parsed.get('seconds_per_epoch', 0.0):.1f} s/epoch, "
             f"{parsed.get('images_per_s', 0.0):,.0f} img/s); target {parsed.get('target')} "
             f"{'reached' if reached else 'not reached'}")  # fmt: skip
    return code == 0 or (code == 1 and not reached), shown


def _judge_study(code: int, parsed: dict[str, Any] | None, lines: list[str]) -> Verdict:
    """run: exit 0, at least one trial finished and none failed; the result is its summary line."""
    for line in reversed(lines):
        m = _STUDY_LINE.match(line.strip())
        if m:
            complete, pruned, failed = (int(g) for g in m.groups()[:3])
            return code == 0 and failed == 0 and complete + pruned > 0, line.strip()
    return False, _last(lines, code)


def _last(lines: list[str], code: int) -> str:
    """The last non-empty output line with the exit code: the result of a step that said nothing else."""
    last = next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")
    return f"exit {code}: {last[:300]}"


# ---------------------------------------------------------------- running


def run_step(step: Step, out: Path, env: dict[str, str]) -> Outcome:
    """Run ``step`` with its output in ``out/<name>.log``; stop its whole process group at its limit."""
    outcome = Outcome(step.name, step.shown, [sys.executable, *step.argv], step.limit_s, "skipped")
    if step.skip:
        outcome.result = step.skip
        return outcome
    log = out / f"{step.name}.log"
    outcome.log = log.name
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        # Its own session: a step's children (workers, loader processes) stop with it at the limit.
        proc = subprocess.Popen(outcome.argv, cwd=step.cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            code: int | None = proc.wait(timeout=step.limit_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop(proc)
    outcome.seconds = time.perf_counter() - t0
    outcome.exit_code = proc.returncode
    lines = log.read_text(errors="replace").splitlines()
    outcome.json = _last_json(lines) if step.json else None
    if code is None:
        outcome.status, outcome.result = "timed out", f"stopped at its limit of {step.limit_s:g} s: {_last(lines, proc.returncode)}"
    else:
        passed, outcome.result = step.judge(code, outcome.json, lines)
        outcome.status = "passed" if passed else "failed"
    if outcome.json is None or outcome.status != "passed":
        outcome.tail = lines[-TAIL_LINES:]
    return outcome


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End ``proc`` and every process of its group still running: SIGTERM, then SIGKILL after `KILL_GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone: nothing left of the step
            break
        if wait is None or _group_gone(proc, wait):
            break
    proc.wait()


def _group_gone(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Whether the process group ``proc`` leads has no process left within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _last_json(lines: list[str]) -> dict[str, Any] | None:
    """The last line that is a JSON object, among the last few (warnings may follow it on stderr)."""
    for line in reversed(lines[-TAIL_LINES:]):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            return value if isinstance(value, dict) else None
    return None


def step_env() -> dict[str, str]:
    """The steps' environment: this one, unbuffered, with the checkout importable (it need not be installed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------- the card


def device_card() -> dict[str, Any]:
    """torch, CUDA and cuDNN versions, each GPU's name and memory, the CPU's model, flags and cores, library versions."""
    cuda = torch.cuda.is_available()
    card: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "gpus": [],
    }
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        card["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                             "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})  # fmt: skip
    model, flags = cpu_info()
    card["cpu"] = {"model": model, "flags": speed_flags(), "missing_flags": [f for f in SPEED_FLAGS if f not in flags],
                   "cores_usable": cpu_threads(), "cores": os.cpu_count(), "machine": platform.machine()}  # fmt: skip
    card["packages"] = {name: _version(name) for name in PACKAGES}
    return card


def _version(name: str) -> str | None:
    """The installed version of distribution ``name``, None when it is missing."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- the record


def markdown(record: dict[str, Any]) -> str:
    """device.md: the steps' table, the device card, and the end of each failed step's output."""
    card = record["card"]
    gpus = card["gpus"]
    where = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) if gpus else "the CPU (no CUDA device: the CPU parts only)"
    lines = [f"# Device check: {'passed' if record['passed'] else 'FAILED'}", "",
             f"{record['started']}, `{record['command']}`, on {where}; {record['seconds']:.0f} s in all.", "",
             "| step | status | seconds | limit | result | command |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s in record["steps"]:
        result = str(s["result"]).replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['limit_s']:g} | {result} | `{s['command']}` |")
    cpu = card["cpu"]
    lines += ["", "## Device card", "", "| | |", "|---|---|",
              f"| torch | {card['torch']} (built for CUDA {card['cuda_build'] or 'none'}; cuDNN {card['cudnn'] or '-'}) |"]  # fmt: skip
    for g in gpus:
        lines.append(f"| GPU {g['index']} | {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}, "
                     f"{g['multiprocessors']} multiprocessors |")  # fmt: skip
    if not gpus:
        lines.append("| GPU | none visible to torch |")
    flags = ", ".join(cpu["flags"]) or "none of " + ", ".join(SPEED_FLAGS)
    lines += [f"| CPU | {cpu['model']} ({cpu['machine']}); flags: {flags}"
              + (f" (no {', '.join(cpu['missing_flags'])})" if cpu["missing_flags"] and cpu["flags"] else "")
              + f"; {cpu['cores_usable']} usable cores of {cpu['cores']} |",
              f"| Python | {card['python']} |",
              "| packages | " + ", ".join(f"{n} {v or 'MISSING'}" for n, v in card["packages"].items()) + " |"]  # fmt: skip
    for s in record["steps"]:
        if s["status"] in ("failed", "timed out") and s["tail"]:
            lines += ["", f"## {s['name']}: {s['status']} (the end of {s['log']})", "", "```", *s["tail"], "```"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    """Run the steps on CUDA (or their CPU versions), write device.json and device.md, print a summary."""
    cuda = torch.cuda.is_available()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, root = default_data(args.data), checkout()
    started, t0 = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cifar-hpo-device-") as scratch:
        steps = plan(cuda, data, Path(scratch), root)
        if not cuda:
            print(f"no CUDA device: running the CPU parts only; skipped: {', '.join(s.gpu_part for s in steps)}", flush=True)
        env, outcomes = step_env(), []
        for i, step in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {step.name}: {step.shown} (limit {step.limit_s:g} s)", flush=True)
            outcome = run_step(step, out, env)
            print(f"    {outcome.status}" + (f" in {outcome.seconds:.1f} s" if outcome.log else "") + f": {outcome.result}", flush=True)
            outcomes.append(outcome)
    passed = all(o.status in ("passed", "skipped") for o in outcomes)
    record: dict[str, Any] = {
        "command": f"cifar-hpo bench device --data {data} --out {out}" + (" --json" if args.json else ""),
        "started": started,
        "seconds": time.perf_counter() - t0,
        "cuda": cuda,
        "data": data,
        "passed": passed,
        "card": device_card(),
        "steps": [vars(o) for o in outcomes],
    }
    (out / "device.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "device.md").write_text(markdown(record))
    summary: dict[str, Any] = {"device": ", ".join(g["name"] for g in record["card"]["gpus"]) or "cpu (no CUDA device)"}
    summary.update({o.name: f"{o.status} {o.seconds:.1f} s" for o in outcomes})
    summary.update(passed=passed, seconds=round(record["seconds"], 1), record=str(out / "device.json"), page=str(out / "device.md"))
    emit(summary, args.json)
    return 0 if passed else 1
