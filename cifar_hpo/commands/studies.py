"""``cifar-hpo studies``: one line per bundled study file.

    cifar-hpo studies
    cifar-hpo studies --dir my_studies/
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cifar_hpo.errors import UserError
from cifar_hpo.study.spec import STUDIES_DIR, list_specs

if TYPE_CHECKING:

    pass


def main(args: argparse.Namespace) -> int:
    """``cifar-hpo studies``: one line per study file (name, model, recipe kind, budget, description)."""
    folder = args.dir or STUDIES_DIR
    specs = list_specs(folder)
    if not specs:
        # An empty listing that exits 0 hid a broken install (bundled files not shipped).
        raise UserError(f"no study files (*.toml) in {folder}; pass --dir with a folder of study files")
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name:<{width}}  {s.model:<12} {s.recipe:<3} {s.epochs:>3} epochs x {s.trials:>3} trials  {s.description}")
    return 0
