"""The generated AlignmentRun CRD as the API server sees it: printer columns, `kubectl
explain`, every example accepted, every bad manifest refused with the field named, by the API
server and by `alignctl validate` in the same words (rule parity)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import AlignmentRun, parse_run
from alignment_operator.cli import main as alignctl
from alignment_operator.render.manifests import RenderContext, build_stage
import engines
from controlplane import REPO

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD = sorted((REPO / "tests/manifests/bad").glob("*.yaml"))


def header(path: Path) -> dict[str, str]:
    """The `# key: value` comment lines at the top of a manifest (expect, server-expect, child)."""
    fields = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep and key.strip() in ("expect", "server-expect", "rule", "server", "child", "child-swap"):
            fields[key.strip()] = value.strip()
    return fields


def rule(path: Path) -> str:
    """The words of the rule a bad manifest breaks, which the API server's refusal and `alignctl validate`'s
    must both hold: `# rule:`, else the server's message (server-expect past "Invalid value: "), else expect.
    tests/unit/test_api.py counts the rules and holds alignctl's half without a cluster."""
    fields = header(path)
    return fields.get("rule") or fields.get("server-expect", "").rpartition("Invalid value: ")[2] or fields["expect"]


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
    status = {"phase": "Running", "currentStage": "dpo", "progress": "1/3", "progressSummary": "dpo 43% ETA 2h10m",
              "model": "/workspace/tiny/sft/final"}
    cluster.kubectl("patch", "alignmentrun", "tiny", "-n", namespace, "--subresource=status",
                    "--type=merge", "-p", json.dumps({"status": status}))

    lines = cluster.kubectl("get", "alignmentruns", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "MODEL", "GPU-H", "AGE"]
    assert lines[1].split()[:8] == ["tiny", "Running", "dpo", "dpo", "43%", "ETA", "2h10m", "/workspace/tiny/sft/final"]
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


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_manifest_is_refused_naming_the_field(cluster, crds, namespace, path, capsys):
    fields = header(path)
    expected = fields.get("server-expect") or fields.get("expect")
    assert expected, f"{path.name} has no `# expect:` header"

    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert alignctl(["validate", str(path)]) == 1, f"alignctl validate accepted {path.name}"
    validate = capsys.readouterr().err
    if fields.get("server", "").startswith("accepts"):  # only the operator can tell (it refuses the run when read)
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"the API server accepted {path.name}"
    # Refused by the API server, naming what is wrong: 422 Invalid (schema, CEL) prints
    # `The AlignmentRun "x" is invalid: ...`; strict field decoding `Error from server (BadRequest)`.
    assert "is invalid:" in result.stderr or "Error from server" in result.stderr, result.stderr
    assert expected in result.stderr
    # Rule parity: the server and `alignctl validate` refuse it in the rule's words.
    words = rule(path)
    assert words in flat(result.stderr) and words in flat(validate), (
        f"{path.name}: the API server and alignctl validate disagree on {words!r}:\n"
        f"server: {result.stderr}\nalignctl validate: {validate}")


# ---------------------------------------------------------------- refused at admission, not at child creation

CHILD_REFUSED = [p for p in BAD if header(p).get("child", "").startswith("refused")]


def render_bypassing_admission(path: Path, namespace: str) -> dict:
    """The stage Job a bad manifest would become if admission let it through (types only).

    `# child-swap: BAD -> STAND-IN`: a value even the types refuse is rendered as the stand-in,
    then put back into the Job."""
    text = path.read_text()
    bad, _, stand_in = header(path).get("child-swap", "").partition(" -> ")
    run = AlignmentRun.model_validate(yaml.safe_load(text.replace(bad, stand_in) if bad else text))
    run.metadata.namespace = namespace
    job = json.dumps(build_stage(run, 0, RenderContext(), "h")[-1])
    if bad:
        assert stand_in in job, f"{path.name}: the stand-in {stand_in!r} is not in the rendered Job"
        job = job.replace(stand_in, bad)
    return json.loads(job)


def test_there_are_a_dozen_bad_specs_only_child_creation_refused_before():
    assert len(CHILD_REFUSED) >= 12, [p.name for p in CHILD_REFUSED]


@pytest.mark.parametrize("path", CHILD_REFUSED, ids=lambda p: p.name)
def test_without_admission_the_api_server_would_refuse_the_stage_job(cluster, namespace, path):
    # Keeps the `# child: refused` headers honest: each is a spec that, before admission knew the
    # core/v1 rules, was accepted as a run and then refused when its Job was created.
    job = render_bypassing_admission(path, namespace)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(job), check=False)
    assert result.returncode != 0, f"the API server accepts the Job {path.name} renders to: drop `# child: refused`"
    assert "is invalid" in result.stderr or "strict decoding error" in result.stderr, result.stderr


def test_valid_pod_settings_pass_admission_and_their_job_passes_the_api_server(cluster, crds, namespace):
    """No false refusals: every core/v1 shape, valid, is accepted by the CRD, and the Job it
    renders to by the API server (tests/unit/test_admission.py: by `alignctl validate`)."""
    path = REPO / "tests/manifests/good/pod-settings.yaml"
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr
    job = render_bypassing_admission(path, namespace)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(job), check=False)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- rendered children against the real schemas

@pytest.fixture(scope="module")
def jobset(cluster):
    """JobSet's CRD from its Go module (tools/k8s/jobset, rendered by tools/k8s/build.sh)."""
    cluster.kubectl("apply", "--server-side", "-f", "-", input=engines.crd("jobset", "jobsets.jobset.x-k8s.io"))
    cluster.wait_established("jobsets.jobset.x-k8s.io")


def zephyr(namespace: str, nodes: int):
    doc = yaml.safe_load((REPO / "examples/zephyr-run.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["queueName"] = "team-a"
    doc["spec"]["trainer"]["hfTokenSecretRef"] = {"name": "hf", "key": "token"}
    doc["spec"]["stages"][0]["resources"]["nodes"] = nodes
    return parse_run(doc)


@pytest.mark.parametrize("nodes,ctx,kind", [
    (1, RenderContext(), "Job"),
    (3, RenderContext(), "Job"),
    (2, RenderContext(pytorchjob_available=True), "PyTorchJob"),
    (4, RenderContext(jobset_available=True, pytorchjob_available=True), "JobSet"),
], ids=["job", "indexed-job", "pytorchjob", "jobset"])
def test_rendered_stage_is_accepted_by_the_real_schemas(cluster, crds, jobset, namespace, nodes, ctx, kind):
    """The failure policies (podFailurePolicy, podReplacementPolicy, JobSet failurePolicy) and
    everything else a stage renders, server-dry-run against Kubernetes' and JobSet's validation."""
    objects = build_stage(zephyr(namespace, nodes), 0, ctx, "h", suspend=True)
    assert objects[-1]["kind"] == kind
    for obj in objects:
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
        assert result.returncode == 0, f"{obj['kind']} {obj['metadata']['name']}:\n{result.stderr}"


# ---------------------------------------------------------------- the core/v1 copy is Kubernetes' own

def test_corev1_schemas_match_the_api_servers_openapi(cluster, tmp_path):
    """api/corev1.json regenerated from this API server's /openapi/v3/api/v1 is the committed file."""
    doc = json.loads(cluster.kubectl("get", "--raw", "/openapi/v3/api/v1").stdout)
    source = tmp_path / "api__v1_openapi.json"
    source.write_text(json.dumps(doc))
    sys.path.insert(0, str(REPO / "tools"))
    import gen_corev1_schemas

    committed = (REPO / "operator/alignment_operator/api/corev1.json").read_text()
    fresh = gen_corev1_schemas.generate(str(source), json.loads(committed)["source"])
    assert fresh == committed, "api/corev1.json drifted from the API server: run `python tools/gen_corev1_schemas.py`"
