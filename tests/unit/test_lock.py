"""constraints.txt is the one tested set: the venv the tests run in, pyproject's ranges and both
images agree with it, so what the tests passed with is what a cluster runs."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from lock import FLASH_ATTN, LOCK, read_lock  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def lock_drift(versions: dict[str, str]) -> list[str]:
    """Installed packages whose version is not the locked one."""
    drift = []
    for name, locked in sorted(versions.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (the operator-only install, GPU-only packages)
        if have != locked:
            drift.append(f"{name}: installed {have}, locked {locked}")
    return drift


def test_the_installed_packages_are_the_locked_ones():
    versions, _ = read_lock()
    drift = lock_drift(versions)
    assert not drift, ("the venv drifted from constraints.txt: " + "; ".join(drift)
                       + ". Run scripts/setup (installs the lock), or scripts/lock to refresh it and rerun the tests")


def test_a_deliberate_mismatch_is_caught(tmp_path):
    versions, _ = read_lock()
    shifted = {**versions, "pyyaml": versions["pyyaml"] + ".post99"}
    assert lock_drift(shifted) == [f"pyyaml: installed {metadata.version('pyyaml')}, locked {shifted['pyyaml']}"]


def test_the_lock_pins_every_requirement_within_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    versions, _ = read_lock()
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    requirements += [line.split("#")[0].strip() for line in (REPO / "trainer_image/requirements.txt").read_text().splitlines()
                     if line.split("#")[0].strip()]
    problems = []
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in versions:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(versions[name], prereleases=True):
            problems.append(f"{req.name}: locked {versions[name]} is outside {req.specifier}")
    assert not problems, "; ".join(problems) + ". Run scripts/lock"


def test_the_installed_torch_has_the_locked_cuda():
    torch = pytest.importorskip("torch")
    _, cuda = read_lock()
    assert cuda and ".".join(torch.version.cuda.split(".")[:2]) == cuda


def _dockerfile(path: str) -> str:
    return (REPO / path).read_text()


@pytest.mark.parametrize("path", ["trainer_image/Dockerfile", "operator/Dockerfile"])
def test_both_images_install_under_the_lock(path):
    text = _dockerfile(path)
    assert re.search(r"^COPY (\S+ )*constraints\.txt ", text, re.M), f"{path} does not copy constraints.txt"
    # Every pip install in the image is constrained (PIP_CONSTRAINT names the copied lock).
    assert re.search(r"^ARG PIP_CONSTRAINT=/\S*constraints\.txt$", text, re.M), f"{path}: no PIP_CONSTRAINT"


def test_the_trainer_image_has_the_locked_torch_cuda_and_no_flash_attn_build():
    text = _dockerfile("trainer_image/Dockerfile")
    versions, cuda = read_lock()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    tag = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-cudnn-devel-\S+", base)
    assert tag, f"the GPU base {base} is not an nvidia/cuda devel image"
    assert tag.group(1) == cuda, f"base image CUDA {tag.group(1)} != the locked torch's CUDA {cuda}"
    # torch is installed by pip at the locked version, never taken from the base image (pinned in the
    # Dockerfile itself so its layer comes before constraints.txt is copied).
    spec = re.search(r"^ARG TORCH_SPEC=(\S+)$", text, re.M)
    assert spec and spec.group(1) == f"torch=={versions['torch']}", \
        f"trainer_image/Dockerfile's TORCH_SPEC {spec and spec.group(1)} is not the lock's torch=={versions['torch']}"
    # flash attention without a source build: no flash-attn by default (the opt-in build's version is
    # the lock's), the [gpu] extra's hub kernels instead (tests/unit/test_release.py resolves them)
    assert versions["flash-attn"] == FLASH_ATTN
    assert re.search(r"^ARG FLASH_ATTN_VERSION=$", text, re.M), "the GPU image source-builds flash-attn by default"
    assert re.search(r"^ARG GPU_EXTRA=gpu$", text, re.M) and "kernels" in versions


def test_setup_and_image_builds_install_under_the_lock():
    setup = (REPO / "scripts/setup").read_text()
    # (install: uv pip install, or pip with ALIGNMENT_SETUP_WITH_PIP=1; the same arguments)
    assert re.search(r'\n\s*install \.venv -c constraints\.txt -e "\.\[trainer,dev\]"', setup)
    assert re.search(r'uv pip install --quiet --python "\$venv/bin/python" "\$@"', setup)
    assert re.search(r'pip install --quiet "\$@"', setup)
    images = (REPO / "scripts/build-images").read_text()
    assert "constraints.txt" in images  # part of the images' input hash: a new lock rebuilds them
