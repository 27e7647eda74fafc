"""The layering that keeps the contract in one place: finetune_api imports neither side, and the
operator imports no trainer (nor dev-cluster) code, so its image can leave the trainer out.

Imports are read with ``ast`` (nothing is imported), including the ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "finetune_api": ROOT / "operator" / "finetune_api",
    "finetune_operator": ROOT / "operator" / "finetune_operator",
    "finetune_trainer": ROOT / "trainer-image" / "finetune_trainer",
}
FORBIDDEN = {
    "finetune_api": {"finetune_operator", "finetune_trainer", "finetune_devcluster"},
    "finetune_operator": {"finetune_trainer", "finetune_devcluster"},
    "finetune_trainer": {"finetune_operator", "finetune_devcluster"},
}


def imported_top_levels(path: Path) -> dict[str, int]:
    """Top-level package of every absolute import in ``path`` -> the first line importing it."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def test_the_import_reader_sees_nested_and_from_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os.path\nfrom . import sibling\n\ndef f():\n    from finetune_trainer.errors import X\n")
    assert imported_top_levels(module) == {"os": 1, "finetune_trainer": 5}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_it_must_not(package):
    modules = sorted(PACKAGES[package].rglob("*.py"))
    assert modules, f"no modules found under {PACKAGES[package]}"
    bad = [
        f"{module.relative_to(ROOT)}:{line}: imports {top}"
        for module in modules
        for top, line in imported_top_levels(module).items()
        if top in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)
