"""``cifar-hpo export``: a final model as ONNX, a torch.export program, a checkpoint and a model card, each checked.

    cifar-hpo export --study fast --out exported/fast

The formats and their checks: `cifar_hpo.deploy.export`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cifar_hpo.deploy.export import (
    Check,
    _reference,
    check_images,
    check_loaded,
    check_out_folder,
    export_onnx,
    export_program,
    export_torchscript,
    model_card,
)
from cifar_hpo.errors import UserError, first_line
from cifar_hpo.models.final import FINAL_NAME, deployed, final_path, load_final
from cifar_hpo.storage import checkpoint
from cifar_hpo.study.spec import check_study_name, load_spec


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo export``."""
    name = args.study
    if name.endswith(".toml"):  # a study file: its study name may differ from the file name
        name = load_spec(name).name
    else:
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
    check_out_folder(out)  # before the model is built and every format exported
    module = deployed(final)
    images, checked_on = check_images(final, getattr(args, "data", None), getattr(args, "cache_dir", None))
    reference = _reference(module, images)
    example = torch.from_numpy(images[:4].copy())
    classes = list(final["classes"])
    out.mkdir(parents=True, exist_ok=True)
    formats: dict[str, str] = {}
    checks: dict[str, Check] = {}
    problems: list[str] = []
    attempts = [
        ("model.onnx", export_onnx, "ONNX (ONNX Runtime); input `images` float (B, 3, 32, 32) in [0, 1] -> `probabilities` (B, C); "
         "class names in its metadata"),
        ("model.pt2", export_program, "torch.export program; float images in [0, 1] (B, 3, 32, 32) -> probabilities"),
    ]  # fmt: skip
    if getattr(args, "torchscript", False):
        attempts.append(("model.ts", export_torchscript,
                         "TorchScript (deprecated since PyTorch 2.11); uint8 0..255 or float [0, 1] images -> probabilities"))  # fmt: skip
    for filename, write, what in attempts:
        path = out / filename
        try:
            write(module, example, path, classes)
            check = check_loaded(path, reference, images)
            if not check.ok:
                raise RuntimeError(
                    f"reloaded program differs from the model: max probability difference {check.max_diff:.2e}, "
                    f"top-1 agreement {check.agree}/{check.images}"
                )
        except Exception as e:
            path.unlink(missing_ok=True)
            first = first_line(e)
            problems.append(f"{filename}: {first}" if isinstance(e, UserError) else f"{filename}: {type(e).__name__}: {first}")
            print(f"note: {filename} not written ({problems[-1]})")
            continue
        formats[filename], checks[filename] = what, check
        print(f"wrote {path} (checked on {check.images:,} test images: max probability difference {check.max_diff:.1e}, "
              f"top-1 agreement {check.agree}/{check.images})")  # fmt: skip
    if not formats:
        raise UserError(f"no format could export {final['model']}: {'; '.join(problems)}")
    checkpoint.save(final, out / FINAL_NAME)
    formats[FINAL_NAME] = "checkpoint: weights, parameters, classes, normalization, metrics (torch.load(weights_only=True))"
    formats["classes.json"] = "class names in output order"
    checkpoint.atomic_write_bytes(out / "classes.json", (json.dumps(classes, indent=1) + "\n").encode(), mode=0o644)
    card = model_card(final, formats, checks, checked_on)
    checkpoint.atomic_write_bytes(out / "MODEL_CARD.md", card.encode(), mode=0o644)
    print(f"wrote {out / FINAL_NAME}, {out / 'classes.json'}, {out / 'MODEL_CARD.md'}")
    return 0
