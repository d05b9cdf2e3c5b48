"""DESIGN.md's layering, enforced: one module talks to the API server, one registers with kopf."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "operator" / "alignment_operator", ROOT / "trainer_image" / "alignment_trainer"]

# Who may import what: anything else importing these is a layering bug.
ALLOWED = {
    "kubernetes": {"alignment_operator/kube.py", "alignment_operator/handlers.py"},  # handlers: ApiException only
    "kopf": {"alignment_operator/handlers.py", "alignment_operator/cli.py"},          # cli: kopf.operator()
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_kube_and_handlers_touch_the_cluster():
    offenders = []
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            rel = path.relative_to(package.parent).as_posix()
            for module, allowed in ALLOWED.items():
                if module in imported_roots(path) and rel not in allowed:
                    offenders.append(f"{rel} imports {module}")
    assert not offenders, offenders


def test_the_operator_package_never_imports_torch():
    """The operator image has no torch: nothing under alignment_operator may import it, even lazily."""
    heavy = {"torch", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed"}
    offenders = [f"{p.name}: {sorted(imported_roots(p) & heavy)}"
                 for p in PACKAGES[0].rglob("*.py") if imported_roots(p) & heavy]
    assert not offenders, offenders
