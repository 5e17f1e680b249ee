"""The package's layout holds: layers import downwards only, no import cycle, reasons for imports inside functions.

Layers, lowest first (cifar_hpo/__init__.py says the same in words):
    errors, params, device, plots   values and helpers every layer uses
    storage                          the database, heartbeats, artifacts, files
    data                             sources -> arrays -> split -> tensors
    models                           the registry and one module per family; the final.pt format
    training                         the loop, optimizers, evaluation, augmentation
    study                            spec, search spaces, pruning, objective, workers, retraining
    report, deploy                   figures and the page; export and predict
    commands, bench                  one module per command; benchmarks
    cli                              argparse only
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cifar_hpo"
RANKS = {
    "errors": 0, "params": 0, "device": 0, "plots": 0,
    "storage": 1, "data": 2, "models": 3, "training": 4, "study": 5,
    "report": 6, "deploy": 6, "commands": 7, "bench": 7, "cli": 8, "__init__": 8,
}  # fmt: skip


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _submodule(package: str, name: str) -> str:
    """``package.name`` when that is a module of ours, else ``package`` (``name`` is a name defined in it)."""
    path = PACKAGE.parent / (package + "." + name).replace(".", "/")
    return f"{package}.{name}" if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else package


def _imports(tree: ast.Module, module: str) -> list[tuple[ast.stmt, str, bool, bool]]:
    """(node, imported cifar_hpo module, at module level, only for type checking) for every import of our own code."""
    found: list[tuple[ast.stmt, str, bool, bool]] = []

    def visit(node: ast.AST, top: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, top, True)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                names = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif child.module:
                    # `from cifar_hpo.x import y`: y may be a submodule (cifar_hpo.x.y) or a name in cifar_hpo.x
                    names = [_submodule(child.module, a.name) for a in child.names]
                for n in names:
                    if n == "cifar_hpo" or n.startswith("cifar_hpo."):
                        found.append((child, n, top, typing_only))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, False, typing_only)
            else:
                visit(child, top, typing_only)

    visit(tree, True, False)
    return found


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = sorted({_layer(m) for m in _modules()} - set(RANKS) - {"search_spaces", "studies"})
    assert not unknown, f"add these to RANKS (and to the layer list in cifar_hpo/__init__.py): {unknown}"


def test_layers_import_only_downwards() -> None:
    upward = []
    for module, tree in _modules().items():
        source = _layer(module)
        for node, target, _, _ in _imports(tree, module):
            dest = _layer(target)
            if dest == source or dest not in RANKS:
                continue
            same_rank_other_package = RANKS[dest] == RANKS[source] and RANKS[source] > 0
            if RANKS[dest] > RANKS[source] or same_rank_other_package:
                upward.append(f"{module}:{node.lineno} imports {target}")
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, tree in modules.items():
        for _, target, top, typing_only in _imports(tree, module):
            while target not in modules and "." in target:  # `from cifar_hpo.x import name`: the module is cifar_hpo.x
                target = target.rsplit(".", 1)[0]
            if top and not typing_only and target in modules and target != module:
                graph[module].add(target)
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state[n] == 1:
                cycles.append(" -> ".join([*path[path.index(n):], n]) if n in path else f"{m} -> {n}")
            elif state[n] == 0:
                walk(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            walk(m, [m])
    # A package importing its own submodules at the top (re-exports) is not a cycle unless a submodule imports back.
    real = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))
            or len(set(c.split(" -> "))) > 2]  # fmt: skip
    assert not real, "import cycles:\n" + "\n".join(real)


def test_imports_inside_functions_say_why() -> None:
    silent = []
    for module, tree in _modules().items():
        base = PACKAGE.parent / module.replace(".", "/")
        lines = (base / "__init__.py" if base.is_dir() else base.with_suffix(".py")).read_text().splitlines()
        for node, _, top, typing_only in _imports(tree, module):
            if top or typing_only:
                continue
            here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if "#" not in here and not above.startswith("#"):
                silent.append(f"{module}:{node.lineno} {here.strip()}")
    assert not silent, "own-module imports inside a function without a comment saying why:\n" + "\n".join(silent)


def test_the_command_line_answers_help_without_torch_or_optuna() -> None:
    code = "import sys, cifar_hpo.cli; print(sorted(m for m in ('torch', 'optuna', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
