"""DESIGN.md's layering, enforced: two packages, one direction; one module talks to the API
server, one registers with kopf; the operator never imports torch; no import circle inside a package
(a lazy import inside a function counts: it is a circle all the same, only hidden)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR, TRAINER = "alignment_operator", "alignment_trainer"
PACKAGES = {OPERATOR: ROOT / "operator" / OPERATOR, TRAINER: ROOT / "trainer_image" / TRAINER}

# The trainer's torch-free contract: the only trainer modules the operator may import.
CONTRACT = {"alignment_trainer.recipe", "alignment_trainer.methods", "alignment_trainer.rules",
            "alignment_trainer.launch", "alignment_trainer.checkpoints", "alignment_trainer.outcome"}
# Who may import what: anything else importing these is a layering bug.
ALLOWED = {
    "kubernetes": {"alignment_operator/kube.py"},
    "kopf": {"alignment_operator/handlers.py", "alignment_operator/cli.py"},  # cli: kopf.operator()
}
HEAVY = {"torch", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed", "matplotlib"}


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (`from x import y` counts x and x.y)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_name(package: str, directory: Path, path: Path) -> str:
    parts = [package, *path.relative_to(directory).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(package: str, directory: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in the file (relative or absolute;
    `from . import x` and `from .m import x` count the submodule x or the module m)."""
    modules = {module_name(package, directory, p): p for p in directory.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    head = base.split(".")[:len(base.split(".")) - node.level + 1]
                    target = ".".join(head + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(packages: dict[str, Path]) -> list[str]:
    found = []
    for package, directory in packages.items():
        for circle in circles(internal_imports(package, directory)):
            found.append(f"import circle: {' <-> '.join(circle)}")
    for package, directory in packages.items():
        for path in sorted(directory.rglob("*.py")):
            rel = f"{package}/{path.relative_to(directory).as_posix()}"
            names = imports(path)
            roots = {n.split(".")[0] for n in names}
            for module, allowed in ALLOWED.items():
                if module in roots and rel not in allowed:
                    found.append(f"{rel} imports {module}")
            if package == TRAINER and OPERATOR in roots:
                found.append(f"{rel} imports {OPERATOR}: the trainer never imports the operator")
            if package == OPERATOR:
                trainer = {n for n in names if n.split(".")[0] == TRAINER}
                outside = {n for n in trainer
                           if n != TRAINER and not any(n == c or n.startswith(c + ".") for c in CONTRACT)}
                if outside:
                    found.append(f"{rel} imports {sorted(outside)}: only the trainer's contract "
                                 f"({', '.join(sorted(CONTRACT))})")
                if roots & HEAVY:
                    found.append(f"{rel} imports {sorted(roots & HEAVY)}: the operator image has no training stack")
    return found


def test_the_tree_keeps_its_layers():
    assert violations(PACKAGES) == []


def test_the_check_fails_on_a_deliberate_import_in_either_direction(tmp_path):
    """The same check on a copy of the tree with one bad import added each way."""
    copies = {name: tmp_path / name for name in PACKAGES}
    for name, directory in PACKAGES.items():
        shutil.copytree(directory, copies[name], ignore=shutil.ignore_patterns("__pycache__"))
    with (copies[TRAINER] / "data.py").open("a") as f:
        f.write("\nfrom alignment_operator.api import parse_run  # deliberate\n")
    with (copies[OPERATOR] / "render" / "recipe.py").open("a") as f:
        f.write("\nfrom alignment_trainer.stages import dpo  # deliberate\n")
    with (copies[OPERATOR] / "reconcile.py").open("a") as f:
        f.write("\nimport torch  # deliberate\n")
    with (copies[OPERATOR] / "identity.py").open("a") as f:  # lazily, as render.manifests once took stage_hash
        f.write("\ndef deliberate():\n    from .reconcile import reconcile\n")
    found = violations(copies)
    assert "alignment_trainer/data.py imports alignment_operator: the trainer never imports the operator" in found
    assert any(v.startswith("alignment_operator/render/recipe.py imports ['alignment_trainer.stages'") for v in found)
    assert "alignment_operator/reconcile.py imports ['torch']: the operator image has no training stack" in found
    assert any(v.startswith("import circle: ") and "alignment_operator.identity" in v
               and "alignment_operator.reconcile" in v for v in found), found
    assert len(found) == 4, found


def missing_dependencies(directory: Path, dependencies: list[str]) -> list[str]:
    """Third-party modules imported under `directory` (lazily or not) that no distribution in
    `dependencies` (pyproject requirement strings) provides."""
    import re
    import sys
    from importlib.metadata import packages_distributions

    provides = packages_distributions()
    declared = {re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in dependencies}
    found = []
    for path in sorted(directory.rglob("*.py")):
        for name in sorted(imports(path)):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in (OPERATOR, TRAINER, "__future__"):
                continue
            dists = {d.lower().replace("_", "-") for d in provides.get(top, [top])}
            if not dists & declared:
                found.append(f"{path.relative_to(ROOT)} imports {top} ({', '.join(sorted(dists))}), "
                             f"not in pyproject's dependencies")
    return sorted(set(found))


def test_the_operator_image_has_every_package_the_operator_imports():
    """operator/Dockerfile installs the package without extras: what the operator imports must be a
    base dependency (cryptography was only in [dev], and the operator pod crashed at start-up making
    its progress endpoint's certificate)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert missing_dependencies(PACKAGES[OPERATOR], project["dependencies"]) == []
    without = [d for d in project["dependencies"] if not d.startswith("cryptography")]
    assert any("imports cryptography" in m for m in missing_dependencies(PACKAGES[OPERATOR], without))
