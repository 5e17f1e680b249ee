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

``--checkpoint`` may also be a folder holding exactly one of these (``results/STUDY``).
A model file may come from anywhere: the input size it declares must be (3, 32, 32),
what every cifar-hpo model takes, before any image is made at it, and one blank image
is run through it to check it gives one probability per class name.

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

from cifar_hpo.data.decode import INPUT_SIZE, to_rgb
from cifar_hpo.data.sources import link_problem
from cifar_hpo.errors import UserError, first_line

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


PREDICT_BATCH = 256  # images per forward pass


ONNX_EXTRA = "pip install 'cifar-hpo[onnx]'"  # how a user gets onnx, onnxscript and onnxruntime


ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"  # names of the ONNX graph's input and output


MODEL_FILES = ("final.pt", "model.pt2", "model.onnx")  # what `--checkpoint FOLDER` looks for (retrain / export write them)


MAX_CLASSES_JSON_BYTES = 1 << 20  # a classes.json beside a model is read whole: 1 MiB is ~10,000 long class names


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
            raise UserError(f"{item} {_absent(item)}; pass image files or folders of images")
    return paths


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (3, H, W) RGB, resized (PIL bilinear) to ``size`` = (H, W) when it differs.

    Raises:
        UserError: not a readable image (the file is named).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = to_rgb(im)  # 16-bit images scaled, not clipped
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
    """The class names embedded in a model, else those of the ``classes.json`` beside it (its size bounded first)."""
    text = embedded
    beside = path.with_name("classes.json")
    if text is None and beside.is_file():
        if beside.stat().st_size > MAX_CLASSES_JSON_BYTES:
            raise UserError(f"{beside} is {beside.stat().st_size:,} bytes, more than class names take (at most "
                            f"{MAX_CLASSES_JSON_BYTES:,} are read); export the model again with `cifar-hpo export`")  # fmt: skip
        text = beside.read_text(errors="replace")
    if text is None:
        raise UserError(f"{path} carries no class names and there is no {beside}; export it again with `cifar-hpo export`")
    classes = _json(text)
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UserError(f"the class names of {path} are not a list of strings; export it again with `cifar-hpo export`")
    return classes


def _json(text: str) -> Any:
    """``text`` parsed as JSON, or None when it is not JSON (the caller names the file)."""
    try:
        return json.loads(text)
    except ValueError:  # JSONDecodeError, and ValueError for numbers too long to convert
        return None


def _input_size(size: Any, path: Path) -> tuple[int, int, int]:
    """``size`` = (C, H, W) read from ``path``, when it is the one size the models take (images are allocated at it)."""
    if not isinstance(size, (list, tuple)) or list(size) != list(INPUT_SIZE):
        raise UserError(f"{path} takes images of size {size!r}, not {list(INPUT_SIZE)} as every cifar-hpo model does; "
                        "it is damaged, edited or not from cifar-hpo: export it again with `cifar-hpo export`")  # fmt: skip
    return INPUT_SIZE


def load_onnx(path: Path) -> Predictor:
    """model.onnx through ONNX Runtime (float input in [0, 1]); no torch involved."""
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    shape = session.get_inputs()[0].shape  # ['batch', 3, 32, 32]
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise UserError(f"{path} takes input of shape {shape}, not (batch, 3, H, W); export it again with `cifar-hpo export`")
    size = _input_size(shape[1:], path)
    name = session.get_inputs()[0].name

    def probabilities(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: x.astype(np.float32) / np.float32(255.0)})[0])

    return Predictor(probabilities, _classes_beside(path, meta.get("classes")), size, "onnxruntime")


def load_program(path: Path) -> Predictor:
    """model.pt2 (a ``torch.export`` program, float input in [0, 1]); classes embedded or beside it."""
    import torch

    from cifar_hpo.models.final import zip_problem  # torch: the ONNX path never imports it

    problem = zip_problem(path)
    if problem:
        raise UserError(f"{path} cannot be loaded safely: {problem}; export it again with `cifar-hpo export`")
    extra = {"classes.json": "", "input_size.json": ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except Exception as e:  # a corrupt or foreign file: torch raises many kinds
        first = first_line(e)
        raise UserError(f"{path} is not a usable torch.export program ({type(e).__name__}: {first}); export it again") from None
    classes = _classes_beside(path, extra["classes.json"] or None)
    size = _input_size(_json(extra["input_size.json"]), path) if extra["input_size.json"] else INPUT_SIZE

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x).float() / 255.0).numpy()

    return Predictor(probabilities, classes, size, "torch.export")


def load_checkpoint(path: Path) -> Predictor:
    """final.pt: the network rebuilt from its parameters, normalization and softmax folded in."""
    import torch

    from cifar_hpo.models.final import deployed, load_final  # torch: the ONNX path never imports it

    final = load_final(path)
    module = deployed(final)

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return Predictor(probabilities, list(final["classes"]), _input_size(final["input_size"], path), "final.pt")


def load(path: Path) -> Predictor:
    """The predictor for ``path``, by its suffix (.onnx, .pt2, else a final checkpoint), checked on one blank image.

    ``path`` may be a folder holding exactly one of `MODEL_FILES` (``results/STUDY``).

    Raises:
        UserError: the file is missing or unusable, or its outputs do not match its class names.
    """
    path = model_file(path)
    if path.suffix.lower() == ".onnx":
        model = load_onnx(path)
    elif path.suffix.lower() == ".pt2":
        model = load_program(path)
    else:
        model = load_checkpoint(path)
    _check_outputs(model, path)
    return model


def model_file(path: Path) -> Path:
    """``path`` itself, or the one model file (`MODEL_FILES`) in the folder ``path``.

    Raises:
        UserError: nothing there, or a folder holding none or several of them (they are named).
    """
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if len(found) == 1:
            return found[0]
        if found:
            raise UserError(f"--checkpoint {path} is a folder holding {', '.join(p.name for p in found)}; pass one of them, "
                            f"e.g. --checkpoint {found[-1]}")  # fmt: skip
        raise UserError(f"--checkpoint {path} is a folder without {', '.join(MODEL_FILES)}; pass one of those files "
                        "(made by retrain / export)")  # fmt: skip
    if not path.is_file():
        raise UserError(f"{path} {_absent(path)}; pass a final.pt, model.pt2 or model.onnx (made by retrain / export)")
    return path


def _absent(path: Path) -> str:
    """Why a path that is neither file nor folder is not there: "does not exist", or what is wrong with its link."""
    problem = link_problem(path)
    return f"is {problem}" if problem else "does not exist"


def _check_outputs(model: Predictor, path: Path) -> None:
    """Run ``model`` on one blank image: it must take `INPUT_SIZE` and give one probability per class name."""
    try:
        probs = model.probabilities(np.zeros((1, *model.input_size), dtype=np.uint8))
    except Exception as e:  # a program that does not take the images it declares: torch and onnxruntime raise many kinds
        raise UserError(f"{path} does not run on a {model.input_size} image ({type(e).__name__}: {first_line(e)}); "
                        "export it again with `cifar-hpo export`") from None  # fmt: skip
    if probs.shape != (1, len(model.classes)):
        raise UserError(f"{path} gives outputs of shape {tuple(probs.shape)[1:]} for {len(model.classes)} class names; "
                        "export it again with `cifar-hpo export`")  # fmt: skip


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
