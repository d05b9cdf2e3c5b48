"""The chart's NetworkPolicy for the operator's two ports, read against the objects it must let in
and keep out. The test node's pod network (Debian's CNI bridge + host-local + portmap, see
/work/shared/notes/real-node.md) implements no NetworkPolicy, so a connection test there would
pass with or without the policy; instead its selectors are evaluated, by Kubernetes' label-selector
rules, against the labels of a stage pod the operator renders, of other pods and of namespaces,
and the API server validates the policy (server-side dry run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from alignment_operator.api import parse_run
from alignment_operator.render.manifests import RenderContext, build_stage
from kubelet import apply_tiny, get_run, stage, wait_for
from test_chart import by_kind, helm, render  # noqa: F401 - helm is a fixture
from test_progress_cluster import AUDIENCE, operator, post, report, stage_wiring  # noqa: F401 - a fixture

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against labels, as the API server reads it ({} matches everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def admits(policy: dict, port: str, pod: dict[str, str], namespace: dict[str, str]) -> bool:
    """Whether an ingress rule lets a pod (labels) of a namespace (labels) reach the named port."""
    for rule in policy["spec"].get("ingress") or []:
        if not any(p["port"] == port for p in rule.get("ports") or []):
            continue
        for peer in rule.get("from") or []:
            ns_ok = matches(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer else False
            pod_ok = matches(peer["podSelector"], pod) if "podSelector" in peer else True
            if "namespaceSelector" not in peer:  # a podSelector alone: the policy's own namespace
                ns_ok = namespace.get("kubernetes.io/metadata.name") == policy["metadata"]["namespace"]
            if ns_ok and pod_ok:
                return True
    return False


def stage_pod_labels() -> dict[str, str]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="u1")
    objects = build_stage(parse_run(doc), 1, RenderContext(progress_url="https://op:8443", progress_ca="x"), "h")
    job = next(o for o in objects if o["kind"] == "Job")
    return job["spec"]["template"]["metadata"]["labels"]


def ns(name: str, **labels: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **labels}


def test_the_networkpolicy_admits_stage_pods_to_progress_and_monitoring_to_metrics(helm, tmp_path):  # noqa: F811
    docs = render(helm, "alignment-system")
    policy, = by_kind(docs, "NetworkPolicy")
    deployment, = by_kind(docs, "Deployment")
    template = deployment["spec"]["template"]
    assert matches(policy["spec"]["podSelector"], template["metadata"]["labels"])   # it guards the operator's pods
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    assert {"progress", "metrics"} <= ports
    stage = stage_pod_labels()
    assert admits(policy, "progress", stage, ns("team-a"))
    assert not admits(policy, "metrics", stage, ns("team-a"))
    for other in ({"app": "notebook"}, {"alignment.dev/run": "tiny"}, {}):  # not a stage pod
        assert not admits(policy, "progress", other, ns("team-a")), other
    assert admits(policy, "metrics", {"app": "prometheus"}, ns("monitoring"))
    assert not admits(policy, "metrics", {"app": "prometheus"}, ns("default"))
    assert not admits(policy, "health", stage, ns("team-a"))   # the kubelet's probes come from the node

    # Namespaced: stage pods of the watched namespaces only; the monitoring namespace is a value.
    values = {"watchNamespaces": ["team-a", "team-b"],
              "networkPolicy": {"enabled": True, "metricsNamespace": "prometheus"}}
    policy, = by_kind(render(helm, "alignment-system", values, tmp_path), "NetworkPolicy")
    assert admits(policy, "progress", stage, ns("team-b"))
    assert not admits(policy, "progress", stage, ns("team-c"))
    assert admits(policy, "metrics", {}, ns("prometheus"))
    assert not admits(policy, "metrics", {}, ns("monitoring"))
    selected = {"networkPolicy": {"enabled": True, "metricsNamespaceSelector": {"team": "observability"},
                                  "metricsPodSelector": {"app": "prometheus"}}}
    policy, = by_kind(render(helm, "alignment-system", selected, tmp_path), "NetworkPolicy")
    assert admits(policy, "metrics", {"app": "prometheus"}, ns("obs", team="observability"))
    assert not admits(policy, "metrics", {"app": "grafana"}, ns("obs", team="observability"))
    assert not admits(policy, "metrics", {"app": "prometheus"}, ns("monitoring"))

    off = render(helm, "alignment-system", {"networkPolicy": {"enabled": False}}, tmp_path)
    assert not by_kind(off, "NetworkPolicy")


def test_the_api_server_accepts_the_networkpolicy(cluster, helm, namespace, tmp_path):  # noqa: F811
    for values in (None, {"watchNamespaces": [namespace]}):
        policy, = by_kind(render(helm, namespace, values, tmp_path), "NetworkPolicy")
        path = tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        out = cluster.kubectl("apply", "--dry-run=server", "-f", str(path))
        assert "created (server dry run)" in out.stdout, out.stdout


# ------------------------------------------------------------------------------ the progress port, for real

def test_a_token_another_pod_mints_for_the_stages_audience_is_refused_naming_nothing(
        cluster, crds, operator, namespace, tmp_path):  # noqa: F811
    """Any pod of the namespace can have a token minted for the stage's audience (its service
    account may request one): the TokenReview passes, the endpoint's pod check refuses it with a
    401 that names only the audience; the stage's own pod's token is accepted."""
    ns, api = namespace, cluster.api_client()
    core = client.CoreV1Api(api)
    apply_tiny(cluster, ns)
    job = wait_for("the sft Job", lambda: next((j.metadata.name for j in client.BatchV1Api(api).list_namespaced_job(
        ns, label_selector="alignment.dev/run=tiny,alignment.dev/stage=sft").items), None))
    wait_for("sft Running", lambda: stage(get_run(api, ns, "tiny"), "sft").get("phase") == "Running")
    stage_pod = wait_for("the sft pod", lambda: next(iter(core.list_namespaced_pod(
        ns, label_selector=f"batch.kubernetes.io/job-name={job}").items), None))
    notebook = core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "notebook", "labels": {"app": "notebook"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    url, ca = stage_wiring(api, ns, job, tmp_path)
    aud = AUDIENCE.format(ns=ns, name=job)

    def mint(pod) -> str:
        return cluster.kubectl("create", "token", "default", "-n", ns, f"--audience={aud}", "--duration=10m",
                               "--bound-object-kind=Pod", f"--bound-object-name={pod.metadata.name}",
                               f"--bound-object-uid={pod.metadata.uid}").stdout.strip()

    code, text = post(url, ca, mint(notebook), report())
    assert (code, json.loads(text)) == (401, {"error": f"token refused for audience {aud}"})
    assert stage(get_run(api, ns, "tiny"), "sft").get("progress") is None
    assert "notebook is not a pod of stage sft" in operator.log.read_text()  # why: in the log only
    code, text = post(url, ca, mint(stage_pod), report())
    assert code == 200, text
    wait_for("the push in status", lambda: (stage(get_run(api, ns, "tiny"), "sft").get("progress") or {}).get(
        "percent") == 50, timeout=15)
