"""The checkout itself: what CI runs must be runnable as committed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_scripts_ci_runs_are_executable():
    """CI runs a fresh clone, whose file modes are the committed ones."""
    tracked = subprocess.run(["git", "ls-files", ".ci", "scripts", "tools/k8s"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    scripts = [p for p in tracked if p.startswith((".ci/", "scripts/")) or p.endswith(".sh")]
    assert {".ci/run", "scripts/setup", "scripts/test", "tools/k8s/build.sh"} <= set(scripts)
    assert [p for p in scripts if not os.access(ROOT / p, os.X_OK)] == []


def test_test_modules_have_unique_names():
    """pytest (rootdir imports, no packages) refuses to collect two test modules of one name."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_module_defines_a_name_twice():
    """A class or function defined twice (a merge slip) silently keeps only the last one."""
    import ast

    twice = []
    for package in (ROOT / "operator" / "alignment_operator", ROOT / "trainer_image" / "alignment_trainer"):
        for path in package.rglob("*.py"):
            names = [n.name for n in ast.parse(path.read_text()).body
                     if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            twice += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(set(names)) if names.count(n) > 1]
    assert twice == []


def test_an_image_tag_hashes_exactly_what_its_dockerfile_copies():
    """scripts/build-images skips a build when the hash of its inputs is unchanged: a file the
    Dockerfile COPYs but the hash leaves out would leave a stale image in the tests, and one the
    hash names but nothing copies rebuilds (and re-imports 7 GB into the node) for nothing."""
    import re

    script = (ROOT / "scripts/build-images").read_text()
    for name, dockerfile in (("trainer", "trainer_image/Dockerfile"), ("operator", "operator/Dockerfile")):
        body = script[script.index(f"build_{name}() {{"):]
        body = body[:body.index("\n}\n")]
        hashed = set(re.search(r"hash_of ([^)]*)\)", body).group(1).split()) - {".dockerignore"}
        copied = set()
        for line in (ROOT / dockerfile).read_text().splitlines():
            if line.startswith("COPY "):
                copied.update(p.rstrip("/") for p in line.split()[1:-1] if not p.startswith("--"))
        # A directory hashed covers what is copied from inside it.
        covers = lambda path: any(path == h or path.startswith(h + "/") for h in hashed)  # noqa: E731
        assert [p for p in sorted(copied) if not covers(p)] == [], f"{dockerfile}: copied but not hashed"
        assert [h for h in sorted(hashed) if not any(c == h or c.startswith(h + "/") for c in copied)] == [], \
            f"{dockerfile}: hashed but never copied"
