"""Benchmarks: ``cifar-hpo bench WHAT``; each compares side by side in one run.

One module per benchmark; each exposes ``main(args) -> int`` and, with
``--json``, prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

MODULES = {
    "data": "cifar_hpo.bench.data",
    "train": "cifar_hpo.bench.train",
    "time-to-accuracy": "cifar_hpo.bench.time_to_accuracy",
    "pruning": "cifar_hpo.bench.pruning",
    "faults": "cifar_hpo.bench.faults",
    "curves": "cifar_hpo.bench.curves",
    "search": "cifar_hpo.bench.search",
    "device": "cifar_hpo.bench.device",
    "profile": "cifar_hpo.bench.profile",
}


def main(args: argparse.Namespace) -> int:
    """Dispatch ``cifar-hpo bench WHAT`` to its module."""
    module = importlib.import_module(MODULES[args.bench])
    return int(module.main(args) or 0)


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print ``result`` as aligned ``key: value`` lines, then as JSON if asked."""
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if as_json:
        print(json.dumps(result, sort_keys=True))
