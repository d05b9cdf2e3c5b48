"""DESIGN.md's layering, enforced: two packages, one direction; one module talks to the API
server, one registers with kopf; the operator never imports torch."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR, TRAINER = "alignment_operator", "alignment_trainer"
PACKAGES = {OPERATOR: ROOT / "operator" / OPERATOR, TRAINER: ROOT / "trainer_image" / TRAINER}

# The trainer's torch-free contract: the only trainer modules the operator may import.
CONTRACT = {"alignment_trainer.recipe", "alignment_trainer.launch", "alignment_trainer.checkpoints",
            "alignment_trainer.outcome"}
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


def violations(packages: dict[str, Path]) -> list[str]:
    found = []
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
    found = violations(copies)
    assert "alignment_trainer/data.py imports alignment_operator: the trainer never imports the operator" in found
    assert any(v.startswith("alignment_operator/render/recipe.py imports ['alignment_trainer.stages'") for v in found)
    assert "alignment_operator/reconcile.py imports ['torch']: the operator image has no training stack" in found
    assert len(found) == 3, found


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
