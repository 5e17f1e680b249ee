"""Device and version facts: ``--device auto|cpu|cuda[:N]`` -> ``torch.device``, usable CPU cores,
the device's name and the library versions recorded with every trial and final model.

torch is imported inside the functions, so data.py (decoding worker
processes) can use `cpu_threads` without loading torch.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import TYPE_CHECKING

from cifar_hpo.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Return the training device; ``auto`` picks CUDA when present.

    Raises:
        UserError: the name is malformed or names a GPU that is not there.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0.."
                f"cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device(name)
    raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def cpu_threads() -> int:
    """Cores this process may use (honours affinity masks set by a launcher)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# The CPU flags that decide how fast this project trains on a CPU (README, "per CPU kind").
SPEED_FLAGS = ("amx_bf16", "avx512f", "avx2")


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags from ``cpuinfo`` (the platform's name and no flags where there is none)."""
    model, flags = platform.processor() or "unknown", frozenset[str]()
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def speed_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of `SPEED_FLAGS` this CPU has, in that order."""
    flags = cpu_info(cpuinfo)[1]
    return [f for f in SPEED_FLAGS if f in flags]


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16`` in /proc/cpuinfo's flags) that oneDNN may use.

    bf16 autocast pays on a CPU only with them: fast_cnn trained at 1,091 img/s in
    bf16 vs 370 in fp32 on a Xeon with AMX, but at 187 vs 323 (fp32 channels_last)
    on a Xeon with AVX-512 bf16 and no AMX.

    A cap on oneDNN's instruction sets below AMX (``ONEDNN_MAX_CPU_ISA=AVX2`` or
    ``AVX512_CORE``, as ``cifar-hpo bench profile --isa`` sets, or a user who wants
    fp32) leaves oneDNN without the tiles: then this says False too.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    return "amx_bf16" in cpu_info(cpuinfo)[1]


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU model, or the CPU with its cores."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {cpu_threads()} cores)"


def library_versions() -> dict[str, str]:
    """Versions recorded with every trial and checkpoint."""
    import optuna
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "optuna": str(optuna.__version__),
    }
