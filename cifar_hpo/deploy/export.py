"""``cifar-hpo export``: a final model as files other programs load.

    cifar-hpo export --study fast --out exported/fast
    cifar-hpo predict --checkpoint exported/fast/model.onnx photo.jpg more_photos/ --top 3

``export`` writes into ``--out``:

- ``model.onnx``: ONNX (``torch.onnx.export(..., dynamo=True)``, one file, weights
  inside) for ONNX Runtime and any other ONNX consumer. Input ``images``: float
  (B, 3, 32, 32) in [0, 1], any batch size; output ``probabilities`` (B, C).
  Normalization and softmax are folded in. The class names are in the model's
  metadata (``custom_metadata_map["classes"]``, a JSON list). Needs the ``onnx``
  extra (``pip install 'cifar-hpo[onnx]'``); without it the other files are still
  written and a note names the extra.
- ``model.pt2``: the same program as ``torch.export`` (same input contract),
  class names embedded: ``torch.export.load("model.pt2").module()``.
- ``final.pt``: the self-describing checkpoint (weights, parameters, classes,
  normalization, metrics, provenance), loadable with ``weights_only=True``.
- ``classes.json`` (class names in output order) and ``MODEL_CARD.md``.
- ``model.ts`` only with ``--torchscript``: TorchScript is deprecated since
  PyTorch 2.11 (``torch.jit.load`` warns on every load; unsupported on Python 3.14).

Before an export counts, each program is loaded back (ONNX in
``onnxruntime.InferenceSession``) and run on real test images of the model's
data (up to ``CHECK_IMAGES``, spread over the split); its probabilities must
match the PyTorch model within ``EXPORT_TOLERANCE`` and its top-1 class must
agree wherever the model's two best classes are not a near-tie. The max
absolute probability difference and the top-1 agreement go into MODEL_CARD.md.
A format that fails is reported and left out.

Predicting from any of the three files: ``cifar_hpo.predict``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cifar_hpo.deploy import predict as predicting
from cifar_hpo.errors import UserError, first_line
from cifar_hpo.models.final import Deployed

EXPORT_TOLERANCE = 1e-4  # max absolute difference in probabilities between a loaded program and the model


CHECK_IMAGES = 1000  # real test images each exported program is checked on (all of them when fewer)


ONNX_OPSET = 18  # torch.onnx's default in 2.x; ONNX Runtime >= 1.16 runs it


def export_torchscript(module: Deployed, example: torch.Tensor, path: Path, classes: list[str] | None = None) -> None:
    """Trace the network, script the wrapper around it (so the dtype branch stays), save (classes: classes.json only).

    Only with ``--torchscript``: torch.jit is deprecated since PyTorch 2.11.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the user asked for it explicitly
        mean, std = cast(torch.Tensor, module.mean), cast(torch.Tensor, module.std)  # buffers
        traced = torch.jit.trace(cast(nn.Module, module.net), ((example.float() / 255.0 - mean) / std,))
        scripted = torch.jit.script(Deployed(traced, mean.flatten().tolist(), std.flatten().tolist()))
        _atomic(path, lambda tmp: scripted.save(str(tmp)))


def _batch_dim() -> Any:
    return {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}


def export_program(module: Deployed, example: torch.Tensor, path: Path, classes: list[str] | None = None) -> None:
    """``torch.export`` the wrapper for float input in [0, 1] with a dynamic batch size, save (class names embedded)."""
    program = torch.export.export(module, (example.float() / 255.0,), dynamic_shapes=_batch_dim())
    extra = {"input_size.json": json.dumps(list(example.shape[1:]))}
    if classes is not None:
        extra["classes.json"] = json.dumps(classes)
    _atomic(path, lambda tmp: torch.export.save(program, str(tmp), extra_files=extra))


def onnx_missing() -> str | None:
    """Why ONNX export cannot run here (one line naming the extra), or None when it can."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed: {predicting.ONNX_EXTRA}"
    return None


def export_onnx(module: Deployed, example: torch.Tensor, path: Path, classes: list[str] | None = None) -> None:
    """``torch.onnx.export(dynamo=True)`` for float input in [0, 1], dynamic batch, one self-contained file.

    Raises:
        UserError: onnx / onnxscript missing (the extra is named).
    """
    why = onnx_missing()
    if why is not None:
        raise UserError(why)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on decompositions; the result is checked below
        program = torch.onnx.export(
            module, (example.float() / 255.0,), dynamo=True, dynamic_shapes=_batch_dim(), opset_version=ONNX_OPSET,
            input_names=[predicting.ONNX_INPUT], output_names=[predicting.ONNX_OUTPUT], verbose=False,
        )  # fmt: skip
    assert program is not None
    if classes is not None:
        program.model.metadata_props["classes"] = json.dumps(classes)
    program.model.metadata_props["input"] = "float32 (batch, 3, H, W) RGB in [0, 1]; output: class probabilities"
    _atomic(path, lambda tmp: program.save(str(tmp), external_data=False))  # weights inside: one file to ship


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot be made or written, before any format is exported; nothing is left behind.

    The nearest existing folder is probed with an unnamed temporary file: a read-only file system refuses it
    even to root, for whom permission bits (and so ``os.access``) say nothing.

    Raises:
        UserError: ``out`` is a file, lies under one, or its nearest existing folder cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    existing = out
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is not a folder, so nothing can be made under it; pass another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {existing} ({e.strerror or first_line(e)}); pass a writable folder") from None


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export wants the .pt2 suffix
    try:
        write(tmp)
        os.chmod(tmp, 0o600)  # the weights, like final.pt: readable by their owner only
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Check:
    """How a reloaded program compares with the PyTorch model on real images."""

    images: int
    max_diff: float  # max absolute difference of probabilities
    agree: int  # images with the same top-1 class
    real_disagreements: int  # top-1 differs although the model's two best classes are not a near-tie

    @property
    def ok(self) -> bool:
        return self.max_diff <= EXPORT_TOLERANCE and self.real_disagreements == 0


def compare(got: np.ndarray, want: np.ndarray) -> Check:
    """Probabilities of a loaded program against the model's, (N, C) each."""
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    same = got.argmax(1) == want.argmax(1)
    top2 = np.sort(want, axis=1)[:, -2:] if want.shape[1] > 1 else np.concatenate([want, want], 1)
    # Within the tolerance, only images whose two best classes are closer than 2 x tolerance can flip.
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * EXPORT_TOLERANCE
    return Check(len(got), diff if got.shape == want.shape else math.inf, int(same.sum()), int((~same & ~near_tie).sum()))


def check_images(final: dict[str, Any], source: str | None, cache_dir: Path | None) -> tuple[np.ndarray, str]:
    """Up to CHECK_IMAGES test images of the model's data, spread over the split (uint8 (N, 3, H, W)), and where from.

    Raises:
        UserError: the data cannot be loaded (the message names the source and ``--data``).
    """
    from cifar_hpo import data  # only when test images are needed: an export without them never decodes anything

    src = source or final["data"]["source"]
    try:
        ds = data.load_dataset(src, cache_dir=cache_dir, progress=False)
    except UserError as e:
        raise UserError(f"the exported programs are checked on the model's test images, which cannot be loaded: {e} "
                        "(pass --data with the source the model was trained on)") from None  # fmt: skip
    n = len(ds.test_x)
    idx = np.unique(np.linspace(0, n - 1, min(CHECK_IMAGES, n)).round().astype(int))  # every class, not the first few
    x = np.ascontiguousarray(ds.test_x[idx].transpose(0, 3, 1, 2))
    if x.shape[1:] != tuple(final["input_size"]):
        raise UserError(f"{src} has images of shape {x.shape[1:]}, the model takes {tuple(final['input_size'])}; pass --data")
    return x, f"{len(idx):,} of the {n:,} test images of `{src}`, spread evenly over the split"


def _reference(module: Deployed, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x[i : i + predicting.PREDICT_BATCH])).numpy()
                               for i in range(0, len(x), predicting.PREDICT_BATCH)])  # fmt: skip


def _run_torchscript(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        ts = torch.jit.load(str(path))

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return ts(torch.from_numpy(x)).numpy()

    return probabilities


def check_loaded(path: Path, reference: np.ndarray, x: np.ndarray) -> Check:
    """Load ``path`` as predict would (ONNX in onnxruntime) and compare it on ``x`` (uint8) with ``reference``."""
    if path.suffix == ".ts":
        run = _run_torchscript(path)
    else:
        run = predicting.load(path).probabilities
    got = np.concatenate([run(x[i : i + predicting.PREDICT_BATCH]) for i in range(0, len(x), predicting.PREDICT_BATCH)])
    return compare(got, reference)


def model_card(final: dict[str, Any], formats: dict[str, str], checks: dict[str, Check] | None = None, checked_on: str = "") -> str:
    """MODEL_CARD.md text: data, protocol, parameters, accuracy, hardware, loading."""
    accs = [100 * a for a in final["test_acc"]]
    k = len(accs)
    spread = f" ± {100 * final['test_acc_std']:.2f}" if k > 1 else ""
    data = final["data"]
    if final["default_params"]:
        origin = f"the default parameters of the `{final['spec']['search_space']}` search space (no search)"
    else:
        best = final.get("best_value")
        origin = (
            f"trial {final['trial']} of study `{final['study']}` (validation accuracy {100 * final['trial_value']:.2f} %"
            + (f"; the study's best: {100 * best:.2f} %" if best is not None else "")
            + ")"
        )
    params = "\n".join(f"| {k_} | {v!r} |" for k_, v in final["params"].items())
    mean_seconds = float(np.mean(final["train_seconds"]))
    ips = float(np.mean(final["images_per_s"]))
    loaders = []
    if "model.onnx" in formats:
        loaders.append(
            '```python\nimport json, numpy as np, onnxruntime as ort\nsession = ort.InferenceSession("model.onnx")\n'
            'classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])\n'
            'probs = session.run(None, {"images": images.astype(np.float32) / 255})[0]  # uint8 (B, 3, 32, 32) -> (B, C)\n```'
        )
    if "model.pt2" in formats:
        loaders.append(
            '```python\nimport torch, json\nmodel, classes = torch.export.load("model.pt2").module(), json.load(open("classes.json"))\n'
            "probs = model(images.float() / 255)  # float (B, 3, 32, 32) in [0, 1] -> (B, C) probabilities\n```"
        )
    if "model.ts" in formats:
        loaders.append(
            "TorchScript (deprecated since PyTorch 2.11; `torch.jit.load` warns on every load):\n\n"
            '```python\nimport torch, json\nmodel, classes = torch.jit.load("model.ts"), json.load(open("classes.json"))\n'
            "probs = model(images)  # (B, 3, 32, 32) uint8 0..255 or float 0..1 -> (B, C) probabilities\n```"
        )
    check_rows = "\n".join(
        f"| `{name}` | {c.images:,} | {c.max_diff:.1e} | {c.agree:,} / {c.images:,} ({100 * c.agree / max(c.images, 1):.2f} %) |"
        for name, c in (checks or {}).items()
    )
    files = "\n".join(f"- `{name}`: {what}" for name, what in formats.items())
    versions = ", ".join(f"{k_} {v}" for k_, v in final["versions"].items())
    return f"""# {final["study"]}: {final["model"]} image classifier

Test accuracy: **{sum(accs) / k:.2f}{spread} %** (mean{" ± sample std" if k > 1 else ""} over {k} seed{"s" if k > 1 else ""};
per seed: {", ".join(f"{a:.2f}" for a in accs)} %) on {data["test_images"]:,} test images.
The weights here are those of seed {final["weights_seed"]}.

## Data

- Source: `{data["source"]}`{f" (stratified subset of {data['subset']:,} training images)" if data.get("subset") else ""}
- Classes ({final["num_classes"]}, output order): {", ".join(final["classes"])}
- Trained on {data["train_images"]:,} images (training + validation split, split seed {data["split_seed"]},
  validation fraction {data["val_fraction"]}; split hash `{final["split_hash"]}`), tested once on the test split.
- Input: RGB images {final["input_size"][1]}x{final["input_size"][2]}; normalization (per channel, [0, 1] units)
  mean {", ".join(f"{v:.4f}" for v in final["mean"])}, std {", ".join(f"{v:.4f}" for v in final["std"])}, folded into the programs.

## Protocol

Parameters from {origin}. Retrained from scratch on training + validation images for {final["epochs"]} epochs,
once per seed ({", ".join(str(s) for s in final["seeds"])}), and evaluated once on the test split; the test split was
never used to choose anything.

| parameter | value |
|---|---|
{params}

## Cost

- Parameters: {final["params_count"]:,}
- Training time: {mean_seconds:.1f} s per seed (training plus per-epoch evaluation), {ips:,.0f} training images/s
- Hardware: {final["hardware"]}
- Libraries: {versions}
- Created: {final["created"]}

## Files

{files}

## Export check

Each program was loaded back (`model.onnx` in ONNX Runtime) and run on {checked_on or "test images"}, against the PyTorch
model in memory (tolerance {EXPORT_TOLERANCE:g} on probabilities):

| file | images | max abs probability difference | same top-1 class as PyTorch |
|---|---|---|---|
{check_rows}

## Load

{chr(10).join(loaders)}

Or, with this project installed: `cifar-hpo predict --checkpoint model.onnx IMAGE_OR_FOLDER... --top 3`
(`final.pt` and `model.pt2` work the same and give the same classes).
"""
