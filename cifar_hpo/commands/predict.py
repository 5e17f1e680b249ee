"""``cifar-hpo predict``: classify images with final.pt, model.pt2 or model.onnx.

    cifar-hpo predict --checkpoint exported/fast/model.onnx my_images/

The loaders (the ONNX one never imports torch): `cifar_hpo.deploy.predict`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar_hpo.deploy.predict import image_paths, load, predict
from cifar_hpo.errors import UserError


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo predict``."""
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    model = load(Path(args.checkpoint))
    rows = predict(model, image_paths(list(args.images)), args.top)
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
