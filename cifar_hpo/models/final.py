"""The final model's file format: what ``final.pt`` holds, how it is checked and loaded.

    from cifar_hpo.models.final import build_model, load_final
    model = build_model(load_final(Path("results/fast/final.pt")))   # eval mode, CPU

``cifar-hpo retrain`` writes the file (`cifar_hpo.study.retrain`); export, predict and
report read it through this module only. The file is a plain dict (see
`FINAL_KEYS`) of builtin values and tensors, loadable with
``torch.load(weights_only=True)``; the weights are under ``model_state``, the
key every checkpoint of this project uses. ``final.json`` beside it is the same
dict without the weights (`metrics_json`, `json_bytes`).
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_hpo.data.decode import INPUT_SIZE
from cifar_hpo.errors import UserError, first_line
from cifar_hpo.models.registry import build
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint

FORMAT = "cifar-hpo-final"
FORMAT_VERSION = 1
FINAL_NAME = "final.pt"
# Keys every final.pt holds (export, predict and report rely on them).
FINAL_KEYS = (
    "format", "format_version", "model_state", "weights_seed", "model", "params", "classes", "num_classes",
    "mean", "std", "input_size", "study", "trial", "default_params", "trial_value", "best_value", "optuna_params",
    "split_hash", "data", "epochs", "seeds", "test_acc", "test_acc_mean", "test_acc_std", "test_loss",
    "per_class_acc", "confusion", "histories", "train_seconds", "images_per_s", "peak_mem_mb", "params_count",
    "hardware", "device", "versions", "created", "spec",
)  # fmt: skip


def plain(obj: Any) -> Any:
    """``obj`` with str/int/float subclasses (TorchVersion, numpy scalars) and tuples made plain.

    ``torch.load(weights_only=True)`` refuses any class it does not know, so
    everything saved in a final checkpoint must be a builtin container, a
    builtin scalar or a tensor.
    """
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    return str(obj)


def metrics_json(final: dict[str, Any]) -> dict[str, Any]:
    """final.pt without the weights: what final.json holds."""
    return {k: v for k, v in final.items() if k != "model_state"}


def final_path(results: Path, study: str) -> Path:
    """Where the final checkpoint of ``study`` lives."""
    return results / study / FINAL_NAME


def load_final(path: Path) -> dict[str, Any]:
    """Load a final.pt and check it is one.

    Sizes that decide what is allocated (input_size, the model's shape) are checked before anything is
    built from them: the file may come from anywhere.

    Raises:
        UserError: missing, corrupt, written by a newer cifar-hpo, or not a cifar-hpo final checkpoint.
    """
    problem = zip_problem(path) if path.is_file() else None  # a missing file: checkpoint.load says so
    if problem:
        raise UserError(f"checkpoint {path} cannot be loaded safely: {problem}; write it again with `cifar-hpo retrain`")
    obj = checkpoint.load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a final checkpoint of cifar-hpo (written by `cifar-hpo retrain`)")
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: format_version must be an int >= 1, got {version!r}; it is damaged or edited, write it again")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer cifar-hpo (final.pt format {version}; this one reads up to "
                        f"{FORMAT_VERSION}); upgrade cifar-hpo to use it")  # fmt: skip
    missing = [k for k in FINAL_KEYS if k not in obj]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; write it again with `cifar-hpo retrain`")
    problem = _final_field_problem(obj)
    if problem:
        raise UserError(f"{path}: {problem}; it is damaged or edited, write it again with `cifar-hpo retrain`")
    return obj


def _final_field_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with the fields that loading and predicting use, or None."""

    def numbers(v: Any, n: int) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    n = obj["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        return f"num_classes must be an int >= 2, got {n!r}"
    classes = obj["classes"]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of class names"
    if len(classes) != n:
        return f"it names {len(classes)} classes for a model with {n} outputs"
    if not isinstance(obj["params"], dict) or not isinstance(obj["model_state"], dict):
        return "params and model_state must be dicts"
    if not numbers(obj["mean"], 3) or not numbers(obj["std"], 3) or not all(s > 0 for s in obj["std"]):
        return "mean and std must be 3 numbers each (std > 0)"
    if not isinstance(obj["input_size"], (list, tuple)) or list(obj["input_size"]) != list(INPUT_SIZE):
        # The only size the models take; predict allocates images of this size, so no other is trusted.
        return f"input_size must be {list(INPUT_SIZE)} (what every cifar-hpo model takes), got {obj['input_size']!r}"
    return None


def zip_problem(path: Path) -> str | None:
    """Why torch could allocate more than ``path``'s own size loading it, or None for a safe file.

    torch.save and torch.export.save write a zip of uncompressed (stored) members. torch.load also
    inflates compressed members (a small zip bomb expands without bound) and trusts the storage sizes
    the legacy non-zip format declares; so a file must be a zip whose stored members add up to no more
    than the file itself (overlapping members could otherwise each claim the whole file).
    """
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"it is not the zip archive torch writes ({type(e).__name__}: {first_line(e)}); it is truncated, corrupt or foreign"
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size != m.compress_size:
            return f"its member {m.filename} is compressed, which torch never writes"
    total, size = sum(m.file_size for m in members), path.stat().st_size
    if total > size:
        return f"its members claim {total:,} bytes, more than the {size:,} bytes of the file"
    return None


def build_model(final: dict[str, Any]) -> torch.nn.Module:
    """The final model with its weights, in eval mode on the CPU.

    Pretrained backbones are built without downloading ImageNet weights: the
    checkpoint holds all of them. The model is first built on the meta device
    (no memory) and its shapes compared with the weights, so parameters edited
    to describe a huge model (``arch.hidden = 10**9``, ``num_classes = 10**9``)
    are refused before anything is allocated.

    Raises:
        UserError: the weights do not fit the model the checkpoint names.
    """
    params = TrialParams.from_dict(final["params"]).replace(pretrained=False)
    problem = _weights_problem(params, int(final["num_classes"]), final["model_state"])
    if problem:
        raise UserError(f"the weights in the checkpoint do not fit model {params.model!r} ({problem})")
    model = build(params, int(final["num_classes"]))
    try:
        model.load_state_dict(final["model_state"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"the weights in the checkpoint do not fit model {params.model!r} ({first[:200]})") from None
    return model.eval()


def _weights_problem(params: TrialParams, num_classes: int, state: dict[str, Any]) -> str | None:
    """How ``state`` differs from the model ``params`` describe, found on the meta device; None if it fits."""
    # Our builds register at most len(state) + 3 parameters and buffers (a replaced head): far more means
    # parameters such as arch.depth = 10**9, which would exhaust memory even as meta modules.
    limit = 2 * len(state) + 16
    try:
        with _registrations_at_most(limit), torch.device("meta"):
            want = build(params, num_classes).state_dict()
    except _TooBig:
        return f"its parameters describe a model of more than {limit} weight tensors, far more than the file holds"
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:  # e.g. a negative or non-numeric width
        return f"its parameters build no model: {type(e).__name__}: {first_line(e)}"
    missing, unexpected = [k for k in want if k not in state], [k for k in state if k not in want]
    if missing or unexpected:
        return f"missing {', '.join(missing[:3]) or 'nothing'}; unexpected {', '.join(unexpected[:3]) or 'nothing'}"
    for key, tensor in want.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"{key} is {shape} in the file, {tuple(tensor.shape)} in the model"
    return None


class _TooBig(Exception):
    """More parameters and buffers were registered than `_registrations_at_most` allows."""


@contextlib.contextmanager
def _registrations_at_most(limit: int) -> Iterator[None]:
    """Raise `_TooBig` once more than ``limit`` parameters and buffers are registered on any module."""
    count = 0

    def hook(*_: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooBig

    handles = [
        torch.nn.modules.module.register_module_parameter_registration_hook(hook),
        torch.nn.modules.module.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Deployed(nn.Module):
    """The network with normalization and softmax folded in.

    Input: uint8 images (B, 3, H, W) in 0..255, or float images in [0, 1].
    Output: probabilities (B, num_classes), float32.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = (x.float() - self.mean) / self.std  # type: ignore[operator]
        return torch.softmax(self.net(x).float(), dim=1)


def deployed(final: dict[str, Any]) -> Deployed:
    """The final model of a final.pt as a `Deployed` module (eval mode, CPU)."""
    return Deployed(build_model(final), list(final["mean"]), list(final["std"])).eval()


def json_bytes(final: dict[str, Any]) -> bytes:
    """``final.json``: `metrics_json` as indented JSON (non-finite numbers as null)."""
    return (json.dumps(metrics_json(final), indent=1, default=_json_default) + "\n").encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)
