"""Where training runs fast: bf16 autocast where it pays, channels_last for convolutions, device timing and memory.

Precision (`TrialParams.precision`, see `use_bf16`): "auto", the default, is bf16
autocast on CUDA and on CPUs with AMX, fp32 elsewhere (on a CPU without AMX bf16
ran slower than fp32: `device.cpu_has_amx`); "bf16" and "fp32" force one.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Any

import torch
from torch import nn

from cifar_hpo.device import cpu_has_amx


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast: asked for, or "auto" on CUDA and on CPUs with AMX (`device.cpu_has_amx`)."""
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` where `use_bf16` says so, else a context that changes nothing (fp32)."""
    if use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(model: nn.Module) -> bool:
    """Whether to train ``model`` in channels_last (NHWC) memory format: when it has convolutions.

    On CUDA tensor cores want NHWC; on this project's 2-core CPU oneDNN's
    convolutions ran faster in NHWC too (fast_cnn fp32 2,200 -> 3,100 img/s,
    bf16 3,300 -> 4,800; baseline_cnn fp32 13,800 -> 16,700). A dense network
    gains nothing.
    """
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory in MiB.

    On CUDA the most allocated on ``device`` since its peak statistics were last reset
    (`train` resets them at its start); on a CPU this process's maximum resident set.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so that a timer read after it is true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
