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

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_hpo.errors import UserError
from cifar_hpo.models.registry import build
from cifar_hpo.params import TrialParams
from cifar_hpo.storage import checkpoint

FORMAT = "cifar-hpo-final"
FORMAT_VERSION = 1
FINAL_NAME = "final.pt"
INPUT_SIZE = (3, 32, 32)  # channels, height, width the models take
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

    Raises:
        UserError: missing, corrupt, or not a cifar-hpo final checkpoint.
    """
    obj = checkpoint.load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a final checkpoint of cifar-hpo (written by `cifar-hpo retrain`)")
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
    if not numbers(obj["input_size"], 3) or not all(isinstance(x, int) and x > 0 for x in obj["input_size"]):
        return f"input_size must be 3 positive ints, got {obj['input_size']!r}"
    return None


def build_model(final: dict[str, Any]) -> torch.nn.Module:
    """The final model with its weights, in eval mode on the CPU.

    Pretrained backbones are built without downloading ImageNet weights: the
    checkpoint holds all of them.

    Raises:
        UserError: the weights do not fit the model the checkpoint names.
    """
    params = TrialParams.from_dict(final["params"]).replace(pretrained=False)
    model = build(params, int(final["num_classes"]))
    try:
        model.load_state_dict(final["model_state"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"the weights in the checkpoint do not fit model {params.model!r} ({first[:200]})") from None
    return model.eval()


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
