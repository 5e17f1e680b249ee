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


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16`` in /proc/cpuinfo's flags).

    bf16 autocast pays on a CPU only with them: fast_cnn trained at 1,091 img/s in
    bf16 vs 370 in fp32 on a Xeon with AMX, but at 187 vs 323 (fp32 channels_last)
    on a Xeon with AVX-512 bf16 and no AMX.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:  # not Linux: fp32, the safe choice
        return False


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
