"""The release: .github/workflows/release.yml passes actionlint, its version step refuses a tag that is
not the chart's appVersion, it publishes the image names the chart's defaults pull, and the GPU
trainer image's packages resolve under constraints.txt for the GPU base's Python (a dry run).

actionlint: rhysd/actionlint, from $ACTIONLINT, PATH, or built once (tests/gotools.py). The resolve
uses uv (the venv's) against the package index.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))
import gotools  # noqa: E402
from lock import read_lock  # noqa: E402


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([gotools.actionlint(), "-no-color", str(path)], capture_output=True, text=True, timeout=120)


def test_release_workflow_passes_actionlint(tmp_path):
    broken = tmp_path / "release.yml"  # the linter runs and sees this file: a typo is reported
    broken.write_text(WORKFLOW.read_text().replace("${{ matrix.suffix }}", "${{ matrix.sufix }}", 1))
    bad = lint(broken)
    assert bad.returncode == 1 and 'property "sufix" is not defined' in bad.stdout, bad.stdout + bad.stderr
    good = lint(WORKFLOW)
    assert good.returncode == 0 and good.stdout == "", good.stdout + good.stderr


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_release_runs_on_a_version_tag_and_refuses_one_that_is_not_the_charts(tmp_path):
    flow = workflow()
    assert flow[True]["push"]["tags"] == ["v*.*.*"]  # YAML 1.1 reads the key `on` as True
    app = yaml.safe_load((REPO / "charts/alignment-operator/Chart.yaml").read_text())["appVersion"]
    script = next(s["run"] for s in flow["jobs"]["version"]["steps"] if s.get("id") == "v")

    def step(tag: str, owner: str = "Alignment-Operator"):
        out = tmp_path / f"out-{tag}"
        out.write_text("")
        done = subprocess.run(["bash", "-e", "-c", script], cwd=REPO, capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "TAG": tag, "OWNER": owner, "GITHUB_OUTPUT": str(out)})
        return done, dict(line.split("=", 1) for line in out.read_text().splitlines())

    done, outputs = step(f"v{app}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert outputs == {"version": app, "registry": "ghcr.io/alignment-operator"}  # ghcr wants lower case
    done, outputs = step("v9.9.9")
    assert done.returncode == 1 and outputs == {}
    assert f"tag v9.9.9 is not the chart's appVersion {app}" in done.stdout


def test_release_publishes_the_images_the_charts_defaults_name():
    flow = workflow()
    job = flow["jobs"]["image"]
    image = job["env"]["IMAGE"]
    values = yaml.safe_load((REPO / "charts/alignment-operator/values.yaml").read_text())
    # what the workflow pushes, as the chart names it: the upstream owner, the appVersion tag
    pushed = {}
    for m in job["strategy"]["matrix"]["include"]:
        name = (image.replace("${{ needs.version.outputs.registry }}", "ghcr.io/alignment-operator")
                .replace("${{ matrix.name }}", m["name"]).replace("${{ needs.version.outputs.version }}", "V")
                .replace("${{ matrix.suffix }}", m["suffix"]))
        pushed[name] = m
        assert (REPO / m["dockerfile"]).is_file()
    assert set(pushed) == {"ghcr.io/alignment-operator/operator:V", "ghcr.io/alignment-operator/trainer:V",
                           "ghcr.io/alignment-operator/trainer:V-cpu"}
    assert f"{values['image']['repository']}:V" in pushed and values["image"]["tag"] == ""
    assert f"{values['trainer']['image']['repository']}:V" in pushed and values["trainer"]["image"]["tag"] == ""
    # the chart's default trainer is the GPU flavour (trainer_image/Dockerfile's defaults); -cpu the CPU one
    assert pushed[f"{values['trainer']['image']['repository']}:V"]["build-args"] == ""
    cpu = dict(line.split("=", 1) for line in pushed["ghcr.io/alignment-operator/trainer:V-cpu"]["build-args"].splitlines())
    dockerfile = (REPO / "trainer_image/Dockerfile").read_text()
    for arg in cpu:
        assert re.search(rf"^ARG {arg}(=|$)", dockerfile, re.M), f"{arg} is no ARG of trainer_image/Dockerfile"
    assert cpu["GPU_EXTRA"] == "" and "python3-pip" in cpu["APT_PACKAGES"]


# ---------------------------------------------------------------------------- the GPU image's packages

def gpu_requirements() -> list[str]:
    """What trainer_image/Dockerfile installs in its GPU flavour (defaults): TORCH_SPEC, requirements.txt,
    the [trainer] extra, the [gpu] extra."""
    import tomllib

    dockerfile = (REPO / "trainer_image/Dockerfile").read_text()
    assert re.search(r"^ARG GPU_EXTRA=gpu$", dockerfile, re.M) and re.search(r"^ARG FLASH_ATTN_VERSION=$", dockerfile, re.M)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [re.search(r"^ARG TORCH_SPEC=(\S+)$", dockerfile, re.M).group(1)]
    reqs += [line.split("#")[0].strip() for line in (REPO / "trainer_image/requirements.txt").read_text().splitlines()
             if line.split("#")[0].strip()]
    return reqs + extras["trainer"] + extras["gpu"]


def gpu_python() -> str:
    """The GPU base's Python: nvidia/cuda:*-ubuntu24.04 ships 3.12."""
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", (REPO / "trainer_image/Dockerfile").read_text(), re.M).group(1)
    return {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}[base.rsplit("-", 1)[1]]


def outside_lock(resolved: dict[str, str], locked: dict[str, str]) -> list[str]:
    return sorted(f"{n}=={v}" + (f" (locked {locked[n]})" if n in locked else "")
                  for n, v in resolved.items() if locked.get(n) != v)


def test_gpu_image_packages_resolve_under_the_lock(tmp_path):
    """uv resolves the GPU flavour's whole set for its Python and platform with constraints.txt as
    constraints (index metadata only, nothing installed): every package it picks is the lock's."""
    uv = Path(sys.executable).with_name("uv")
    reqs = tmp_path / "gpu.txt"
    reqs.write_text("\n".join(gpu_requirements()) + "\n")
    done = subprocess.run([str(uv), "pip", "compile", "--quiet", "--no-header", "--no-annotate",
                           "--python-version", gpu_python(), "--python-platform", "x86_64-manylinux_2_28",
                           "-c", str(REPO / "constraints.txt"), str(reqs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)$", done.stdout, re.M)}
    locked, _ = read_lock()
    assert {"torch", "kernels", "bitsandbytes", "deepspeed", "trl"} <= set(resolved)
    assert "flash-attn" not in resolved  # no source build in the image's set
    assert outside_lock(resolved, locked) == [], "GPU image packages not pinned as resolved: run scripts/lock"
    # a package the lock misses is named (the check can fail)
    assert outside_lock(resolved, {k: v for k, v in locked.items() if k != "tomlkit"}) == [f"tomlkit=={resolved['tomlkit']}"]
    # transformers uses the hub kernels only within its own range for `kernels` (else it ignores them)
    from transformers.dependency_versions_table import deps

    assert SpecifierSet(deps["kernels"].removeprefix("kernels")).contains(resolved["kernels"]), deps["kernels"]
