"""The generated AlignmentRun CRD as the API server sees it: printer columns, `kubectl
explain`, every example accepted, every bad manifest refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controlplane import REPO

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD = sorted((REPO / "tests/manifests/bad").glob("*.yaml"))


def header(path: Path) -> dict[str, str]:
    """The `# key: value` comment lines at the top of a manifest (expect, server-expect, server)."""
    fields = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep and key.strip() in ("expect", "server-expect", "server"):
            fields[key.strip()] = value.strip()
    return fields


def server_checks(path: Path) -> bool:
    return not header(path).get("server", "").startswith("no")


def flat(text: str) -> str:
    """Text with all whitespace runs collapsed (kubectl wraps long lines)."""
    return " ".join(text.split())


def test_alignmentrun_crd_is_established(cluster, crds):
    crd = json.loads(cluster.kubectl("get", "crd", "alignmentruns.alignment.dev", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["shortNames"] == ["ar", "arun"]


def test_get_prints_phase_stage_progress_and_model(cluster, crds, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples/tiny-run.yaml"))
    status = {"phase": "Running", "currentStage": "dpo", "progress": "1/3", "model": "/workspace/tiny/sft/final"}
    cluster.kubectl("patch", "alignmentrun", "tiny", "-n", namespace, "--subresource=status",
                    "--type=merge", "-p", json.dumps({"status": status}))

    lines = cluster.kubectl("get", "alignmentruns", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "MODEL", "AGE"]
    assert lines[1].split()[:5] == ["tiny", "Running", "dpo", "1/3", "/workspace/tiny/sft/final"]
    # The short names reach the same resource.
    assert cluster.kubectl("get", "ar", "-n", namespace, "-o", "name").stdout.strip() == "alignmentrun.alignment.dev/tiny"


def test_explain_shows_the_field_descriptions(cluster, crds):
    crd = yaml.safe_load((REPO / "crds/alignmentrun.yaml").read_text())
    stages = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["stages"]
    out = flat(cluster.kubectl("explain", "alignmentrun.spec.stages").stdout)
    assert flat(stages["description"]) in out
    for name, prop in stages["items"]["properties"].items():
        assert name in out
        if "description" in prop:
            assert flat(prop["description"]) in out, f"description of stages[].{name} missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_server(cluster, crds, namespace, path):
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    assert "created (server dry run)" in result.stdout


@pytest.mark.parametrize("path", [p for p in BAD if server_checks(p)], ids=lambda p: p.name)
def test_bad_manifest_is_refused_naming_the_field(cluster, crds, namespace, path):
    fields = header(path)
    expected = fields.get("server-expect") or fields.get("expect")
    assert expected, f"{path.name} has no `# expect:` header"

    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"the API server accepted {path.name}"
    # Refused by the API server, naming what is wrong: 422 Invalid (schema, CEL) prints
    # `The AlignmentRun "x" is invalid: ...`; strict field decoding `Error from server (BadRequest)`.
    assert "is invalid:" in result.stderr or "Error from server" in result.stderr, result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("path", [p for p in BAD if not server_checks(p)], ids=lambda p: p.name)
def test_manifest_marked_server_no_is_indeed_accepted_by_the_server(cluster, crds, namespace, path):
    # Keeps the `# server: no` headers honest: once the CRD learns to refuse one, drop the
    # header so the test above covers it.
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode == 0, f"the server now refuses {path.name}; drop its `# server: no`:\n{result.stderr}"
