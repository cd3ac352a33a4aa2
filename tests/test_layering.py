"""Import layering: the API without torch or kopf, the trainer without kopf, the CLI light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("kubetune.api.v1alpha1", ["torch", "kopf", "transformers", "kubetune_trainer",
                                   "kubetune_operator"]),
        ("kubetune.api.crd", ["torch", "kopf", "transformers"]),
        ("kubetune.cli", ["torch", "kopf", "transformers", "trl", "peft"]),
        ("kubetune_trainer.train", ["kopf", "kubetune_operator", "torch"]),
        ("kubetune_trainer.data.loading", ["kopf", "kubetune_operator"]),
    ],
)
def test_import_does_not_pull_in(module, forbidden):
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing {module} imported {out}"


def test_no_top_level_operator_package_shadows_the_stdlib():
    import operator

    assert hasattr(operator, "itemgetter"), operator.__file__


TRAINER = Path(__file__).resolve().parents[1] / "trainer_image" / "kubetune_trainer"


def _trainer_imports() -> dict[str, set[str]]:
    """Each kubetune_trainer module and the kubetune_trainer modules it imports anywhere in
    its source (inside functions too: a lazy import is an arrow all the same)."""
    modules = {".".join(("kubetune_trainer", *p.relative_to(TRAINER).with_suffix("").parts))
               .removesuffix(".__init__"): p for p in TRAINER.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # from pkg import module
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_trainer_data_code_does_not_import_the_recipes_or_the_shell():
    graph = _trainer_imports()
    data = {m: deps for m, deps in graph.items() if m.startswith("kubetune_trainer.data.")}
    assert "kubetune_trainer.data.prepared" in data  # the scan sees the package
    upward = {m: sorted(d for d in deps if d == "kubetune_trainer.train"
                        or d.startswith("kubetune_trainer.recipes"))
              for m, deps in data.items()}
    upward = {m: d for m, d in upward.items() if d}
    assert not upward, f"data/ imports a layer above it: {upward}"


def test_trainer_imports_have_no_cycle():
    graph = _trainer_imports()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m):], m]))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
