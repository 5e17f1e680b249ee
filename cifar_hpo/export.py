"""``cifar-hpo export`` and ``cifar-hpo predict``: use a final model outside the study.

    cifar-hpo export --study fast --out exported/fast
    cifar-hpo predict --checkpoint results/fast/final.pt photo.jpg more_photos/ --top 3
    cifar-hpo predict --checkpoint exported/fast/final.pt photos/ --json > predictions.json

``export`` writes into ``--out``:

- ``model.ts``: TorchScript (the network traced, inside a scripted wrapper)
  that takes uint8 images (B, 3, 32, 32) in 0..255 or float images in [0, 1]
  and returns class probabilities (B, C). Normalization is folded in, so the
  consumer needs nothing but torch: ``torch.jit.load("model.ts")``.
- ``model.pt2``: the same wrapper as a ``torch.export`` program for float
  images in [0, 1] (dtypes are fixed in an exported program; divide uint8
  images by 255 first), any batch size: ``torch.export.load("model.pt2").module()``.
- ``final.pt``: the self-describing checkpoint (weights, parameters, classes,
  normalization, metrics, provenance), loadable with ``weights_only=True``.
- ``classes.json`` (class names in output order) and ``MODEL_CARD.md``.

Each program is loaded back and checked against the model in memory before
the export counts; a format that fails is reported and left out (TorchScript
and torch.export both work for every model of the registry).

``predict`` reads images of any size and format PIL knows, converts them to
RGB, resizes them to the model's input size (PIL bilinear) when they differ,
and prints the most likely class and its probability per image (``--top K``
classes; ``--json`` prints one JSON list of {path, class, probability, top}).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from cifar_hpo import checkpoint
from cifar_hpo.errors import UserError
from cifar_hpo.final import FINAL_NAME, build_model, final_path, load_final

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PREDICT_BATCH = 256  # images per forward pass
EXPORT_TOLERANCE = 1e-4  # max absolute difference in probabilities between a loaded program and the model


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


# ---------------------------------------------------------------- export


def export_torchscript(module: Deployed, example: torch.Tensor, path: Path) -> None:
    """Trace the network, script the wrapper around it (so the dtype branch stays), save."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; both are written
        mean, std = cast(torch.Tensor, module.mean), cast(torch.Tensor, module.std)  # buffers
        traced = torch.jit.trace(cast(nn.Module, module.net), ((example.float() / 255.0 - mean) / std,))
        scripted = torch.jit.script(Deployed(traced, mean.flatten().tolist(), std.flatten().tolist()))
        _atomic(path, lambda tmp: scripted.save(str(tmp)))


def export_program(module: Deployed, example: torch.Tensor, path: Path) -> None:
    """``torch.export`` the wrapper for float input in [0, 1] with a dynamic batch size, save."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (example.float() / 255.0,), dynamic_shapes={"x": {0: batch}})
    _atomic(path, lambda tmp: torch.export.save(program, str(tmp)))


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export wants the .pt2 suffix
    try:
        write(tmp)
        os.chmod(tmp, 0o600)  # the weights, like final.pt: readable by their owner only
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_loaded(load: Any, reference: Deployed, x: torch.Tensor) -> float:
    """Max absolute difference of probabilities between a reloaded program and the model."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        return float((load()(x) - reference(x)).abs().max())


def model_card(final: dict[str, Any], formats: dict[str, str]) -> str:
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
    if "model.ts" in formats:
        loaders.append(
            '```python\nimport torch, json\nmodel, classes = torch.jit.load("model.ts"), json.load(open("classes.json"))\n'
            "probs = model(images)  # (B, 3, 32, 32) uint8 0..255 or float 0..1 -> (B, C) probabilities\n```"
        )
    if "model.pt2" in formats:
        loaders.append(
            '```python\nimport torch, json\nmodel, classes = torch.export.load("model.pt2").module(), json.load(open("classes.json"))\n'
            "probs = model(images.float() / 255)  # float (B, 3, 32, 32) in [0, 1] -> (B, C) probabilities\n```"
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

## Load

{chr(10).join(loaders)}

Or, with this project installed: `cifar-hpo predict --checkpoint final.pt IMAGE_OR_FOLDER... --top 3`.
"""


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo export``."""
    name = args.study
    if name.endswith(".toml"):  # a study file: its study name may differ from the file name
        from cifar_hpo.spec import load_spec

        name = load_spec(name).name
    else:
        from cifar_hpo.spec import check_study_name

        check_study_name(name, "--study")  # a folder under --results, never a path out of it
    src = final_path(args.results, name)
    if not src.is_file():
        have = sorted(p.parent.name for p in args.results.glob(f"*/{FINAL_NAME}")) if args.results.is_dir() else []
        raise UserError(
            f"study {name!r} has no final model ({src} does not exist); make it with `cifar-hpo retrain --study {name}`"
            + (f"; final models in {args.results}: {', '.join(have)}" if have else "")
        )
    final = load_final(src)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    module = deployed(final)
    c, h, w = final["input_size"]
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (4, c, h, w), dtype=torch.uint8, generator=gen)
    out.mkdir(parents=True, exist_ok=True)
    formats: dict[str, str] = {}
    problems: list[str] = []
    attempts = (
        ("model.ts", export_torchscript, lambda p: torch.jit.load(str(p)), example,
         "TorchScript; uint8 (0..255) or float ([0, 1]) images (B, 3, 32, 32) -> probabilities"),
        ("model.pt2", export_program, lambda p: torch.export.load(str(p)).module(), example.float() / 255.0,
         "torch.export program; float images in [0, 1] (B, 3, 32, 32) -> probabilities"),
    )  # fmt: skip
    for filename, write, load, check_x, what in attempts:
        path = out / filename
        try:
            write(module, example, path)
            diff = _check_loaded(lambda path=path, load=load: load(path), module, check_x)
            if not diff <= EXPORT_TOLERANCE:
                raise RuntimeError(f"reloaded program differs from the model by {diff:.2e}")
        except Exception as e:
            path.unlink(missing_ok=True)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            problems.append(f"{filename}: {type(e).__name__}: {first}")
            print(f"note: {filename} not written ({problems[-1]})")
            continue
        formats[filename] = what
        print(f"wrote {path} (checked: max probability difference {diff:.1e})")
    if not formats:
        raise UserError(f"neither TorchScript nor torch.export could export {final['model']}: {'; '.join(problems)}")
    checkpoint.save(final, out / FINAL_NAME)
    formats[FINAL_NAME] = "checkpoint: weights, parameters, classes, normalization, metrics (torch.load(weights_only=True))"
    formats["classes.json"] = "class names in output order"
    checkpoint.atomic_write_bytes(out / "classes.json", (json.dumps(final["classes"], indent=1) + "\n").encode(), mode=0o644)
    checkpoint.atomic_write_bytes(out / "MODEL_CARD.md", model_card(final, formats).encode(), mode=0o644)
    print(f"wrote {out / FINAL_NAME}, {out / 'classes.json'}, {out / 'MODEL_CARD.md'}")
    return 0


# ---------------------------------------------------------------- predict


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
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable image ({type(e).__name__}: {first}); remove it or pass other files") from None


def predict(final: dict[str, Any], paths: list[Path], top: int) -> list[dict[str, Any]]:
    """Class, probability and the ``top`` most likely classes per image."""
    module = deployed(final)
    classes = list(final["classes"])
    top = max(1, min(top, len(classes)))
    _, h, w = final["input_size"]
    images = [read_image(p, (h, w)) for p in paths]  # all read first: a bad file fails before any output
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(images), PREDICT_BATCH):
            x = torch.from_numpy(np.stack(images[start : start + PREDICT_BATCH]))
            probs = module(x)
            values, indices = probs.topk(top, dim=1)
            for i, path in enumerate(paths[start : start + PREDICT_BATCH]):
                ranked = [{"class": classes[int(j)], "probability": float(v)} for v, j in zip(values[i], indices[i], strict=True)]
                out.append({"path": str(path), "class": ranked[0]["class"], "probability": ranked[0]["probability"], "top": ranked})
    return out


def main_predict(args: argparse.Namespace) -> int:
    """``cifar-hpo predict``."""
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    final = load_final(args.checkpoint)
    rows = predict(final, image_paths(list(args.images)), args.top)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["path"]) for r in rows)
    for r in rows:
        line = f"{r['path']:<{width}}  {r['class']}  {100 * r['probability']:.1f}%"
        if len(r["top"]) > 1:
            line += "   (" + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"]) + ")"
        print(line)
    return 0
