"""constraints.txt says it holds every tested version: every package installed in the venv the
tests run in is pinned there (an unpinned one is a version nothing reproduces: a fresh clone, CI
or an image may get another)."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from lock import read_lock  # noqa: E402

# Not the tested stack: the project itself, and the installers scripts/setup pins on their own (UV_VERSION).
NOT_LOCKED = {"alignment-operator", "pip", "uv"}


def unpinned(locked: dict[str, str]) -> list[str]:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return sorted(f"{name}=={version}" for name, version in installed.items()
                  if name not in locked and name not in NOT_LOCKED)


def test_every_installed_package_is_pinned():
    locked, _ = read_lock()
    missing = unpinned(locked)
    assert not missing, (f"installed but not in constraints.txt: {', '.join(missing)}. Run scripts/lock "
                         "--installed (or add them) and rerun the tests")


def test_an_unpinned_package_is_caught():
    locked, _ = read_lock()
    assert "scipy" in locked and metadata.version("scipy")  # installed and pinned: the check has it to drop
    without = {k: v for k, v in locked.items() if k != "scipy"}
    assert unpinned(without) == [f"scipy=={metadata.version('scipy')}"]
