"""``cifar-hpo bench train``: training images/s per model on the current device.

    cifar-hpo bench train --models fast_cnn,baseline_cnn --precision fp32,bf16 --json

Each model is built with its `models.default_params` recipe (from scratch,
no upsampling, so resnet18 and densenet121 see 32x32 inputs), then trained
on synthetic random batches already on the device: a few warm-up steps, then
``--steps`` timed steps of forward, loss, backward and optimizer step. Data
loading and augmentation are not included (see ``cifar-hpo bench data``).
Every precision asked for is measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from cifar_hpo.bench import emit
from cifar_hpo.device import cpu_threads, resolve_device
from cifar_hpo.errors import UserError
from cifar_hpo.models import MODELS, build, default_params
from cifar_hpo.training.optim import make_optimizer
from cifar_hpo.training.precision import autocast, use_channels_last

WARMUP_STEPS = 3  # first steps pay for allocator growth and oneDNN/cuDNN kernel selection


def measure(name: str, device: torch.device, batch_size: int, steps: int, precision: str) -> float:
    """Training images/s of model ``name`` on ``device`` with synthetic batches."""
    base = default_params(name, device)
    arch = {**base.arch, "upsample": 0} if "upsample" in MODELS[name].arch_keys else base.arch  # 32x32, no upsampling
    params = base.replace(pretrained=False, precision=precision, arch=arch)
    torch.manual_seed(0)
    model = build(params, 10).to(device)
    channels_last = use_channels_last(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    model.train()
    optimizer = make_optimizer(model, params)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> int:
    """Print training images/s per model and precision; with --json, one JSON object last."""
    device = resolve_device(args.device)
    names = [n.strip() for n in args.models.split(",")] if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise UserError(f"--models: unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("auto", "fp32", "bf16")]
    if bad:
        raise UserError(f"--precision: unknown {', '.join(bad)}; use fp32, bf16 or auto (comma-separated)")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": args.batch_size,
        "steps": args.steps,
    }
    img_s: dict[str, dict[str, float]] = {}
    for name in names:
        for precision in precisions:
            ips = measure(name, device, args.batch_size, args.steps, precision)
            img_s.setdefault(name, {})[precision] = round(ips, 1)
            result[f"{name} {precision} img/s"] = ips
    result["img_s"] = img_s
    emit(result, args.json)
    return 0
