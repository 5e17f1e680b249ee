"""``cifar-hpo predict``: classify image files with a final.pt, model.pt2 or model.onnx.

    cifar-hpo predict --checkpoint results/fast/final.pt photo.jpg more_photos/ --top 3
    cifar-hpo predict --checkpoint exported/fast/model.onnx photos/ --json > predictions.json
    cifar-hpo predict --checkpoint exported/fast/model.pt2 photos/

The three formats give the same classes (``cifar-hpo export`` checks that on the
test images). The format is chosen by the file's suffix:

- ``.onnx``: run by ONNX Runtime; this path never imports torch, so a machine
  with only ``pip install onnxruntime numpy pillow`` (and this package) can run it.
  Class names come from the model's metadata (written by ``cifar-hpo export``).
- ``.pt2``: a ``torch.export`` program; class names from its embedded
  ``classes.json`` (or a ``classes.json`` beside it).
- anything else: a final checkpoint (``final.pt``), loaded with ``weights_only=True``.

Images of any size and format PIL knows are converted to RGB and resized to the
model's input size (PIL bilinear) when they differ; each line shows the most
likely class and its probability (``--top K`` classes; ``--json`` prints one JSON
list of {path, class, probability, top}).

This module imports neither torch nor optuna at import time (the ONNX path is
tested in a process where importing torch fails).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_hpo.errors import UserError, first_line

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


PREDICT_BATCH = 256  # images per forward pass


ONNX_EXTRA = "pip install 'cifar-hpo[onnx]'"  # how a user gets onnx, onnxscript and onnxruntime


ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"  # names of the ONNX graph's input and output


@dataclass(frozen=True)
class Predictor:
    """A loaded model in any of the three formats: uint8 images (B, 3, H, W) -> probabilities (B, C), numpy."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    input_size: tuple[int, int, int]  # (C, H, W)
    source: str  # "final.pt", "torch.export" or "onnxruntime"


def image_paths(items: list[Path]) -> list[Path]:
    """Files as given, and image files found under folders (recursively, sorted).

    Raises:
        UserError: a path does not exist, or a folder holds no image files.
    """
    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise UserError(f"folder {item} holds no image files ({', '.join(IMAGE_EXTS)})")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{item} does not exist; pass image files or folders of images")
    return paths


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (3, H, W) RGB, resized (PIL bilinear) to ``size`` = (H, W) when it differs.

    Raises:
        UserError: not a readable image (the file is named).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        if rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        first = first_line(e)
        raise UserError(f"{path} is not a readable image ({type(e).__name__}: {first}); remove it or pass other files") from None


def onnx_session(path: Path) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU.

    Raises:
        UserError: onnxruntime is not installed (the extra is named), or the file is not an ONNX model.
    """
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running {path.name} needs ONNX Runtime, which is not installed: {ONNX_EXTRA}") from None
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = first_line(e)
        raise UserError(f"{path} is not a usable ONNX model ({type(e).__name__}: {first}); export it again (cifar-hpo export)") from None


def _classes_beside(path: Path, embedded: str | None) -> list[str]:
    text = embedded
    beside = path.with_name("classes.json")
    if text is None and beside.is_file():
        text = beside.read_text()
    if text is None:
        raise UserError(f"{path} carries no class names and there is no {beside}; export it again with `cifar-hpo export`")
    classes = json.loads(text)
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UserError(f"the class names of {path} are not a list of strings; export it again with `cifar-hpo export`")
    return classes


def load_onnx(path: Path) -> Predictor:
    """model.onnx through ONNX Runtime (float input in [0, 1]); no torch involved."""
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    shape = session.get_inputs()[0].shape  # ['batch', 3, 32, 32]
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise UserError(f"{path} takes input of shape {shape}, not (batch, 3, H, W); export it again with `cifar-hpo export`")
    name = session.get_inputs()[0].name

    def probabilities(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: x.astype(np.float32) / np.float32(255.0)})[0])

    return Predictor(probabilities, _classes_beside(path, meta.get("classes")), (shape[1], shape[2], shape[3]), "onnxruntime")


def load_program(path: Path) -> Predictor:
    """model.pt2 (a ``torch.export`` program, float input in [0, 1]); classes embedded or beside it."""
    import torch

    extra = {"classes.json": "", "input_size.json": ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except Exception as e:  # a corrupt or foreign file: torch raises many kinds
        first = first_line(e)
        raise UserError(f"{path} is not a usable torch.export program ({type(e).__name__}: {first}); export it again") from None
    classes = _classes_beside(path, extra["classes.json"] or None)
    size = tuple(json.loads(extra["input_size.json"])) if extra["input_size.json"] else (3, 32, 32)

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x).float() / 255.0).numpy()

    return Predictor(probabilities, classes, size, "torch.export")  # type: ignore[arg-type]


def load_checkpoint(path: Path) -> Predictor:
    """final.pt: the network rebuilt from its parameters, normalization and softmax folded in."""
    import torch

    from cifar_hpo.models.final import deployed, load_final  # torch: the ONNX path never imports it

    final = load_final(path)
    module = deployed(final)

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return Predictor(probabilities, list(final["classes"]), tuple(final["input_size"]), "final.pt")  # type: ignore[arg-type]


def load(path: Path) -> Predictor:
    """The predictor for ``path``, by its suffix (.onnx, .pt2, else a final checkpoint).

    Raises:
        UserError: the file is missing or unusable.
    """
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a final.pt, model.pt2 or model.onnx (made by retrain / export)")
    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    if path.suffix.lower() == ".pt2":
        return load_program(path)
    return load_checkpoint(path)


def predict(model: Predictor, paths: list[Path], top: int) -> list[dict[str, Any]]:
    """Class, probability and the ``top`` most likely classes per image (ties: the lower class index first)."""
    top = max(1, min(top, len(model.classes)))
    _, h, w = model.input_size
    images = [read_image(p, (h, w)) for p in paths]  # all read first: a bad file fails before any output
    out: list[dict[str, Any]] = []
    for start in range(0, len(images), PREDICT_BATCH):
        probs = model.probabilities(np.stack(images[start : start + PREDICT_BATCH]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
        for i, path in enumerate(paths[start : start + PREDICT_BATCH]):
            ranked = [{"class": model.classes[int(j)], "probability": float(probs[i, j])} for j in order[i]]
            out.append({"path": str(path), "class": ranked[0]["class"], "probability": ranked[0]["probability"], "top": ranked})
    return out
