"""Imports point one way: common <- (datamodules, lightning_modules, callbacks) <- suite <- bench <- run.py.

The three task-side packages are one layer and never import each other: a module learns about its
data only through `common.task_data.TaskData`, and a helper two of them need lives in `common`.
Read from the source with `ast` (lazy imports inside functions count too), so nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A package may import its own modules and those of a lower layer, never one of its own layer or above.
LAYER = {"common": 0, "datamodules": 1, "lightning_modules": 1, "callbacks": 1, "suite": 2, "bench": 3, "run": 4}


def project_imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of one of the project's packages."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their package
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LAYER]
    return found


def violations(package: str, source: str) -> list[str]:
    return [f"line {line} imports {other}" for line, other in project_imports(source)
            if other != package and LAYER[other] >= LAYER[package]]


def sources() -> list[tuple[str, Path]]:
    found = [("run", ROOT / "run.py")]
    for package in LAYER.keys() - {"run"}:
        found += [(package, path) for path in sorted((ROOT / package).rglob("*.py"))]
    return found


def test_every_package_imports_only_from_the_layers_below_it():
    checked = sources()
    assert {package for package, _ in checked} == set(LAYER) and len(checked) > 50
    bad = [f"{path.relative_to(ROOT)}: {v}" for package, path in checked for v in violations(package, path.read_text())]
    assert not bad, "imports against the layers (move the shared piece into common/):\n" + "\n".join(bad)


def test_the_rule_sees_lazy_imports_peers_and_upward_imports():
    assert violations("datamodules", "from lightning_modules.legal_bert.pretrained import load_tokenizer")
    assert violations("lightning_modules", "def f():\n    from callbacks.fid import SampleQuality\n")
    assert violations("callbacks", "import suite.strategies")
    assert violations("common", "import datamodules.base as base")
    assert violations("lightning_modules", "from bench.timing import Windows")
    assert not violations("suite", "from datamodules.builtin import user_folder\nfrom common.files import atomic_write")
    assert not violations("datamodules", "from datamodules.base import BaseDataModule\nfrom . import formats")
