"""Write constraints.txt: the one tested set of versions that scripts/setup, CI and both images install.

    scripts/lock               # refresh: resolve pyproject's extras anew (newest allowed), write the lock
    scripts/lock --installed   # write what .venv has now (after tests passed with it)

Both read the same roots: the project with its [trainer,gpu,dev] extras and
trainer_image/requirements.txt. The lock pins every package those pull in (exact versions), and
records the CUDA version of the locked torch's wheels, which the trainer image's CUDA base must
match (tests/unit/test_lock.py). flash-attn is pinned here (FLASH_ATTN): it has no wheel
metadata on PyPI that a resolver can read without building it against torch.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
REQUIREMENTS = REPO / "trainer_image" / "requirements.txt"
PROJECT = "alignment-operator"
EXTRAS = ("trainer", "gpu", "dev")
# flash-attn for a GPU image built with FLASH_ATTN_VERSION (opt-in: the default uses torch's SDPA flash kernel
# and transformers' hub kernels, trainer_image/Dockerfile): a version whose build supports the CUDA major.
FLASH_ATTN = "2.8.3"


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def resolved(python: str, *args: str) -> dict[str, str]:
    """Newest versions pip resolves (PyPI metadata only: nothing is installed); default: the roots."""
    roots = args or (f"{REPO}[{','.join(EXTRAS)}]", "-r", str(REQUIREMENTS))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), *roots], check=True)
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items
            if canonicalize_name(i["metadata"]["name"]) != PROJECT}


def installed() -> dict[str, str]:
    """The installed versions of everything the roots need (walks Requires-Dist with markers)."""
    env = default_environment()
    roots = [Requirement(r) for r in metadata.requires(PROJECT) or []]
    todo = [Requirement(r.name + (f"[{','.join(sorted(r.extras))}]" if r.extras else "")) for r in roots
            if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in EXTRAS)]
    todo += [Requirement(line) for line in requirement_lines(REQUIREMENTS)]
    found: dict[str, str] = {}
    missing: list[str] = []
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *req.extras)):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)  # e.g. bitsandbytes: for the GPU image, not installed here
            continue
        if name in found:
            continue
        found[name] = dist.version
        for r in dist.requires or []:
            sub = Requirement(r)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in ("", *req.extras)):
                todo.append(Requirement(sub.name + (f"[{','.join(sorted(sub.extras))}]" if sub.extras else "")))
    found.pop(PROJECT, None)
    if missing:  # GPU-only roots: their newest release (their own dependencies are pinned above)
        found.update(resolved(sys.executable, "--no-deps", *sorted(set(missing))))
    return found


def cuda_of(versions: dict[str, str]) -> str:
    """CUDA major.minor of the locked torch's wheels (nvidia-cuda-runtime[-cuXX])."""
    for name in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12"):
        if name in versions:
            return ".".join(versions[name].split(".")[:2])
    raise SystemExit("the locked torch pulls no nvidia-cuda-runtime wheel: which CUDA would the image need?")


def render(versions: dict[str, str], source: str) -> str:
    versions = {**versions, "flash-attn": FLASH_ATTN}
    lines = [
        "# The tested versions of everything alignment-operator installs: scripts/setup, CI (through",
        "# scripts/setup) and both Dockerfiles install with `-c constraints.txt`.",
        f"# Refresh: scripts/lock (then scripts/setup and the tests). Written from {source} on",
        f"# Python {platform.python_version()}, {sys.platform}-{platform.machine()}.",
        "# tests/unit/test_lock.py fails when the venv, pyproject.toml or the images drift from it.",
        f"# cuda: {cuda_of(versions)}   (torch {versions['torch']}'s CUDA wheels; the trainer image's CUDA base)",
    ]
    lines += [f"{name}=={versions[name]}" for name in sorted(versions)]
    return "\n".join(lines) + "\n"


def read_lock(path: Path = LOCK) -> tuple[dict[str, str], str | None]:
    """(name -> version, the CUDA major.minor recorded) of a lock file."""
    versions, cuda = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*cuda:\s*(\d+\.\d+)", line)
        if m:
            cuda = m.group(1)
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            versions[canonicalize_name(name)] = version
    return versions, cuda


def main(argv: list[str]) -> int:
    if argv not in ([], ["--installed"]):
        print(__doc__, file=sys.stderr)
        return 2
    if argv == ["--installed"]:
        versions, source = installed(), "the installed .venv"
    else:
        versions, source = resolved(sys.executable), "a fresh resolution of pyproject.toml's extras"
    old = read_lock()[0] if LOCK.exists() else {}
    LOCK.write_text(render(versions, source))
    new = read_lock()[0]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            print(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
    print(f"wrote {LOCK.relative_to(REPO)}: {len(new)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
