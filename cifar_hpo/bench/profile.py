"""``cifar-hpo bench profile``: where a study's CPU trial spends its time, per instruction set, side by side.

    cifar-hpo bench profile --study fast_light --isa native,avx2 --repeats 3 --json

One epoch of a trial, taken apart: batch augmentation, forward (with the loss),
backward, optimizer step, lookahead averaging, and evaluation (one pass, and the
last epoch's test-time augmentation), each timed on its own on the study's
recipe network (synchronous on a CPU, so a timer around each phase is exact),
on synthetic uint8 images (speed does not depend on their content). Every
combination of ``--threads``, ``--formats`` (channels_last / contiguous),
``--batch-sizes`` and ``--precisions`` is measured, and each is projected to
the seconds of one epoch of the study's split (45,000 training and 5,000
validation images).

``--isa`` runs the same measurements again with the CPU's instruction sets
capped, each in its own process (oneDNN, ATen and MKL choose their kernels
once, at their first use): ``avx2`` is what a CPU without AVX-512 runs
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``), ``avx512`` a CPU with AVX-512 and no AMX,
``native`` whatever this CPU has. A cap reproduces the kernels, not the other
CPU's caches, memory or clock: an AVX2 figure measured here is an estimate of
an AVX2 machine, to be checked on one. Repeats are interleaved (every ISA once,
then again), and each figure is the median over them, with its spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from cifar_hpo import models
from cifar_hpo.bench import emit
from cifar_hpo.data import DeviceData
from cifar_hpo.device import speed_flags
from cifar_hpo.errors import UserError
from cifar_hpo.params import TrialParams
from cifar_hpo.study.search_space import default_recipe
from cifar_hpo.study.spec import load_spec
from cifar_hpo.training import augment
from cifar_hpo.training.evaluation import evaluate, single_pass_unless
from cifar_hpo.training.optim import LOOKAHEAD_IMAGES, lookahead_step, make_optimizer
from cifar_hpo.training.precision import autocast, use_bf16

# The caps ``--isa`` sets, each in a fresh process. ``native`` sets nothing.
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
PHASES = ("augment", "forward", "backward", "optimizer", "lookahead", "evaluate", "evaluate_tta")
WARMUP_BATCHES = 3  # oneDNN picks its kernels on first use: not timed
EPOCH_TRAIN, EPOCH_EVAL = 45000, 5000  # the study's split: 90% of 50,000 training images, 10% validation


def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every combination asked for, as plain dicts (they travel to the child process as JSON)."""

    def ints(text: str, flag: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"{flag} {text!r}: expected comma-separated whole numbers, e.g. 1,2") from None
        if not values or min(values) < 1:
            raise UserError(f"{flag} {text!r}: expected comma-separated whole numbers of at least 1")
        return values

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("channels_last", "contiguous")]
    if bad or not formats:
        raise UserError(f"--formats {args.formats!r}: use channels_last, contiguous or both, comma-separated")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("auto", "fp32", "bf16")]
    if bad or not precisions:
        raise UserError(f"--precisions {args.precisions!r}: use fp32, bf16 or auto, comma-separated")
    batches = ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else [0]  # 0: the recipe's
    return [
        {"threads": t, "format": f, "batch_size": b, "precision": p}
        for t in ints(args.threads, "--threads") for f in formats for b in batches for p in precisions
    ]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Measure every configuration under every ISA, repeats interleaved; print medians (and JSON last)."""
    isas = [i.strip() for i in args.isa.split(",") if i.strip()]
    bad = [i for i in isas if i not in ISA_ENV]
    if bad or not isas:
        raise UserError(f"--isa {args.isa!r}: use {', '.join(ISA_ENV)} (comma-separated)")
    if args.repeats < 1 or args.eval_images < 64:
        raise UserError("--repeats must be at least 1 and --eval-images at least 64")
    recipe = default_recipe(load_spec(args.study))  # a bad study name is one line here, not one per child
    configs = _configs(args)
    largest = max(c["batch_size"] or recipe.batch_size for c in configs)
    if args.images < (WARMUP_BATCHES + 1) * largest:
        raise UserError(f"--images {args.images}: at least {(WARMUP_BATCHES + 1) * largest} for batches of {largest} "
                        f"({WARMUP_BATCHES} warm-up batches and one timed)")  # fmt: skip
    job = {"study": args.study, "configs": configs, "images": args.images, "eval_images": args.eval_images}
    runs: dict[str, list[list[dict[str, Any]]]] = {isa: [] for isa in isas}
    for r in range(args.repeats):
        for isa in isas:
            print(f"repeat {r + 1}/{args.repeats}: {isa} ...", file=sys.stderr, flush=True)
            runs[isa].append(_child(isa, job))
    rows = _summarize(job["configs"], runs)
    for row in rows:
        print(_line(row))
    result: dict[str, Any] = {
        "study": args.study,
        "cpu_flags": speed_flags(),
        "repeats": args.repeats,
        "images": args.images,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        emit({"cpu flags": " ".join(result["cpu_flags"]) or "unknown"}, False)
    return 0


def _child(isa: str, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``job`` in a fresh process with ``isa``'s caps; its measurements, one dict per configuration."""
    env = {**os.environ, **ISA_ENV[isa]}
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_hpo.bench.profile", json.dumps(job)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench profile: the {isa} measurement failed: {tail}")
    measured: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return measured


def _summarize(configs: list[dict[str, Any]], runs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per ISA and configuration: median microseconds per image of each phase, the projected epoch."""
    rows = []
    for isa, repeats in runs.items():
        for i, config in enumerate(configs):
            samples = [rep[i] for rep in repeats]
            row: dict[str, Any] = {"isa": isa, **config, "batch_size": samples[0]["batch_size"],
                                   "kernels": samples[0]["kernels"], "bf16": samples[0]["bf16"]}  # fmt: skip
            for phase in PHASES:
                row[f"{phase}_us"] = round(statistics.median(s[f"{phase}_us"] for s in samples), 2)
            epochs = [_epoch_seconds(s) for s in samples]
            row["epoch_s"] = round(statistics.median(epochs), 2)
            row["epoch_s_spread"] = round(max(epochs) - min(epochs), 2)
            row["train_img_s"] = round(statistics.median(_train_img_s(s) for s in samples))
            rows.append(row)
    return rows


def _train_us(m: dict[str, Any]) -> float:
    return sum(m[f"{p}_us"] for p in ("augment", "forward", "backward", "optimizer", "lookahead"))


def _train_img_s(m: dict[str, Any]) -> float:
    return 1e6 / _train_us(m)


def _epoch_seconds(m: dict[str, Any]) -> float:
    """One epoch of the study's split (not the last: its evaluation is a single pass)."""
    return (EPOCH_TRAIN * _train_us(m) + EPOCH_EVAL * m["evaluate_us"]) / 1e6


def _line(row: dict[str, Any]) -> str:
    phases = "  ".join(f"{p} {row[f'{p}_us']:.0f}" for p in PHASES)
    return (
        f"{row['isa']:<6} {row['threads']} thr {row['format']:<13} batch {row['batch_size']:<4} {row['precision']:<4}"
        f" (bf16 {'on' if row['bf16'] else 'off'}): epoch {row['epoch_s']:.1f} s (spread {row['epoch_s_spread']:.1f}),"
        f" {row['train_img_s']:,} train img/s; us/image: {phases}"
    )


# --- the child process: one ISA, every configuration -------------------------------------------------------------


def _measure_all(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every configuration of ``job`` in this process (whose environment holds its ISA's caps)."""
    recipe = default_recipe(load_spec(job["study"]))
    kernels = f"aten {torch.backends.cpu.get_cpu_capability()}, onednn cap {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}"
    out = []
    for config in job["configs"]:
        params = recipe.replace(batch_size=config["batch_size"] or recipe.batch_size, precision=config["precision"])
        measured = measure(params, threads=config["threads"], channels_last=config["format"] == "channels_last",
                           images=job["images"], eval_images=job["eval_images"])  # fmt: skip
        out.append({**measured, "batch_size": params.batch_size, "kernels": kernels})
    return out


def measure(params: TrialParams, *, threads: int, channels_last: bool, images: int, eval_images: int) -> dict[str, Any]:
    """Microseconds per image of each phase of one training epoch of ``params`` on ``images`` synthetic images.

    The first batches of the pass are warm-up (oneDNN picks its kernels on first use) and are
    not counted; evaluation is timed after one untimed pass.
    """
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    data = DeviceData(
        train_x=torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g),
        train_y=torch.randint(0, 10, (images,), generator=g),
        eval_x=torch.randint(0, 256, (eval_images, 3, 32, 32), dtype=torch.uint8, generator=g),
        eval_y=torch.randint(0, 10, (eval_images,), generator=g),
        eval_name="val", classes=tuple(str(i) for i in range(10)),
        mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), split_hash="synthetic",
    )  # fmt: skip
    torch.manual_seed(0)
    model = models.build(params, 10)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    capabilities = models.get(params.model).capabilities
    if capabilities.init_from_data:
        model.init_from_data(augment.normalize(data.train_x[:2000], data.mean, data.std))  # type: ignore[operator]
    model.train()
    optimizer = make_optimizer(model, params)
    device = torch.device("cpu")
    totals = dict.fromkeys(PHASES, 0.0)
    lookahead_every = max(1, round(LOOKAHEAD_IMAGES / params.batch_size))
    average = None
    seen, step = 0, 0
    batches = augment.train_batches(data, params.batch_size, strength=params.aug_strength, ops=params.aug_ops,
                                    generator=g, drop_last=True)  # fmt: skip
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        with autocast(device, params.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=params.label_smoothing)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        step += 1
        if params.lookahead and step % lookahead_every == 0:
            average = lookahead_step(average, model, 0.9)  # the decay changes no cost
        t5 = time.perf_counter()
        if step <= WARMUP_BATCHES:
            continue
        seen += len(y)
        for phase, seconds in zip(PHASES[:5], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            totals[phase] += seconds
    result: dict[str, Any] = {f"{p}_us": 1e6 * totals[p] / seen for p in PHASES[:5]}

    def evaluate_on(n: int) -> None:
        evaluate(model, data.eval_x[:n], data.eval_y[:n], mean=data.mean, std=data.std, precision=params.precision)

    for phase, last in (("evaluate", False), ("evaluate_tta", True)):
        with single_pass_unless(model, last, tta=capabilities.tta):
            evaluate_on(256)  # warm-up: eval-mode kernels
            t0 = time.perf_counter()
            evaluate_on(eval_images)
            result[f"{phase}_us"] = 1e6 * (time.perf_counter() - t0) / eval_images
    result["bf16"] = use_bf16(device, params.precision)
    return result


if __name__ == "__main__":  # the child process `_child` starts: one ISA's measurements as JSON on stdout
    print(json.dumps(_measure_all(json.loads(sys.argv[1]))))
