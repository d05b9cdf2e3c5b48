"""The Helm chart against the real control plane: it lints, its manifests pass server-side
validation with default and non-default values, and the operator running under the chart's
ServiceAccount and RBAC (nothing more) drives a run to Succeeded. One rule less and it cannot.

helm comes from tools/k8s/build.sh, like the control plane; a missing helm fails these tests
with the build command (ALIGNMENT_SKIP_CLUSTER=1 skips them).
"""

from __future__ import annotations

import copy
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from controlplane import BUILD_COMMAND, binaries_dir, free_port
from kubelet import SFT, apply_tiny, child, get_run, jobs, play_tiny_stages, wait_for, wait_phase
from operator_process import Operator

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "alignment-operator"
RELEASE = "ao"


@pytest.fixture(scope="session")
def helm(tmp_path_factory):
    """helm from tools/k8s/build.sh, as a function: helm("lint", CHART) -> CompletedProcess."""
    if os.environ.get("ALIGNMENT_SKIP_CLUSTER") == "1":
        pytest.skip("ALIGNMENT_SKIP_CLUSTER=1")
    path = binaries_dir() / "helm"
    if not os.access(path, os.X_OK):
        pytest.fail(f"helm missing in {binaries_dir()}.\nBuild it with `{BUILD_COMMAND}` "
                    "(or set ALIGNMENT_SKIP_CLUSTER=1 to skip these tests).", pytrace=False)
    home = tmp_path_factory.mktemp("helm-home")  # never touch the user's helm config or cache
    env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result
    return run


def render(helm, namespace: str, values: dict | None = None, tmp_path: Path | None = None) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "-n", namespace]
    if values:
        path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.fixture(scope="module")
def chart_crds(cluster, crds):
    """The chart's crds/ (AlignmentRun and kopf's peering CRDs), installed as helm would."""
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    for crd in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        # polled, not `kubectl wait`: that errors while a fresh CRD has no conditions yet
        wait_for(f"{crd} Established", lambda: cluster.kubectl(
            "get", "crd", crd, "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}').stdout == "True")


@pytest.fixture
def extra_namespace(cluster):
    name = f"chart-extra-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def dry_run(cluster, docs: list[dict]) -> subprocess.CompletedProcess:
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs))
    assert "would violate PodSecurity" not in out.stderr, out.stderr
    return out


# ------------------------------------------------------------------------------ lint and render


def test_helm_lint_passes_and_the_schema_refuses_bad_values(helm):
    out = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout
    helm("lint", "--strict", str(CHART), "--set", "watchNamespaces={team-a,team-b}", "--set", "replicaCount=2",
         "--set", "progress.tlsSecretName=ao-progress-tls")
    for bad, field in (("logFormat=xml", "logFormat"), ("replicaCount=two", "replicaCount"),
                       ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"), ("imagee.tag=1", "imagee")):
        out = helm("template", RELEASE, str(CHART), "--set", bad, check=False)
        assert out.returncode != 0 and field in out.stderr, (bad, out.stderr)
    out = helm("template", RELEASE, str(CHART), "--set", "replicaCount=2", "--set", "peering.enabled=false", check=False)
    assert out.returncode != 0 and "needs peering.enabled=true" in out.stderr
    # Two replicas without a TLS Secret of the user's share the installation's CA (a Secret the operator makes).
    out = helm("template", RELEASE, str(CHART), "--set", "replicaCount=2")
    assert "ALIGNMENT_PROGRESS_TLS_SECRET" in out.stdout


def test_default_values_render_manifests_the_server_accepts(cluster, chart_crds, helm, namespace):
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/warn=restricted")
    docs = render(helm, namespace)
    assert sorted(d["kind"] for d in docs) == sorted([
        "ClusterRole", "ClusterRole",  # the users' aggregated edit and view roles (templates/user-roles.yaml)
        "ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
        "ClusterRoleBinding", "Service", "Service", "Deployment", "ClusterKopfPeering",
        "Role", "RoleBinding",  # the installation's progress CA: one Secret in the release namespace
        "NetworkPolicy"])
    deployment = by_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/alignment-operator/operator:0.1.0"
    assert container["args"] == ["--liveness", "http://0.0.0.0:8080/healthz"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert env_of(deployment) == {
        "ALIGNMENT_NAMESPACES": "", "ALIGNMENT_PEERING": RELEASE, "POD_ID": None, "ALIGNMENT_LOG_LEVEL": "info",
        "ALIGNMENT_LOG_FORMAT": "text", "ALIGNMENT_TRAINER_IMAGE": "ghcr.io/alignment-operator/trainer:0.1.0",
        "ALIGNMENT_ACCELERATE_CONFIG_DIR": "/opt/alignment/accelerate", "ALIGNMENT_METRICS_PORT": "9090",
        "ALIGNMENT_PROGRESS_PORT": "8443", "ALIGNMENT_PROGRESS_URL": f"https://{RELEASE}-alignment-operator-progress.{namespace}.svc:8443",
        "ALIGNMENT_PROGRESS_HOSTNAMES": f"{RELEASE}-alignment-operator-progress.{namespace}.svc,"
                                        f"{RELEASE}-alignment-operator-progress.{namespace}.svc.cluster.local",
        "ALIGNMENT_PROGRESS_TLS_SECRET": f"{namespace}/{RELEASE}-alignment-operator-progress-tls"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    service = by_kind(docs, "Service")[0]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert by_kind(docs, "Service")[1]["spec"]["ports"] == [
        {"name": "progress", "port": 8443, "targetPort": "progress", "protocol": "TCP"}]
    assert by_kind(docs, "ClusterKopfPeering")[0]["metadata"]["name"] == RELEASE
    out = dry_run(cluster, docs)
    assert "deployment.apps/ao-alignment-operator created (server dry run)" in out.stdout, out.stdout


def test_custom_values_render_namespaced_manifests_the_server_accepts(cluster, chart_crds, helm, namespace,
                                                                       extra_namespace, tmp_path):
    watched = [namespace, extra_namespace]
    values = {
        "watchNamespaces": watched, "replicaCount": 2, "logLevel": "debug", "logFormat": "json",
        "image": {"repository": "registry.example.com/ml/alignment-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "trainer": {"image": {"repository": "registry.example.com/ml/trainer", "tag": "cu124"},
                    "accelerateConfigDir": "/opt/accelerate"},
        "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                "matchLabels": {"app.kubernetes.io/name": "alignment-operator"}}}}]}},
        "metrics": {"enabled": True, "port": 9191},
        "progress": {"enabled": True, "port": 9443, "tlsSecretName": "ao-progress-tls"},
        "imagePullSecrets": [{"name": "registry"}],
        "podAnnotations": {"example.com/team": "ml-platform"},
    }
    docs = render(helm, namespace, values, tmp_path)
    roles, bindings = by_kind(docs, "Role"), by_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
    assert all(b["subjects"][0]["namespace"] == namespace for b in bindings)
    # cluster-wide, only TokenReview (the progress endpoint) and the read of two CRDs; peering per namespace
    # (the users' aggregated edit/view roles grant the operator nothing: left out here)
    assert [r["metadata"]["name"] for r in by_kind(docs, "ClusterRole") if not any(
        k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in r["metadata"]["labels"])] == [
        f"{namespace}-ao-alignment-operator-token-reviewer", f"{namespace}-ao-alignment-operator-crd-reader"]
    assert sorted(p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")) == sorted(watched)
    assert not by_kind(docs, "ClusterKopfPeering")
    deployment = by_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "registry.example.com/ml/alignment-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == values["resources"]
    assert pod["nodeSelector"] == values["nodeSelector"] and pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"] and pod["imagePullSecrets"] == [{"name": "registry"}]
    env = env_of(deployment)
    assert env["ALIGNMENT_NAMESPACES"] == ",".join(watched)
    assert env["ALIGNMENT_TRAINER_IMAGE"] == "registry.example.com/ml/trainer:cu124"
    assert env["ALIGNMENT_ACCELERATE_CONFIG_DIR"] == "/opt/accelerate"
    assert (env["ALIGNMENT_LOG_LEVEL"], env["ALIGNMENT_LOG_FORMAT"], env["ALIGNMENT_METRICS_PORT"]) == ("debug", "json", "9191")
    assert by_kind(docs, "Service")[0]["spec"]["ports"][0]["port"] == 9191
    assert (env["ALIGNMENT_PROGRESS_PORT"], env["ALIGNMENT_PROGRESS_TLS_DIR"]) == ("9443", "/etc/alignment-operator/progress-tls")
    assert {"name": "progress-tls", "secret": {"secretName": "ao-progress-tls"}} in pod["volumes"]
    dry_run(cluster, docs)


# ------------------------------------------------------------------------------ RBAC, for real


def install_rbac(cluster, docs: list[dict]) -> None:
    """What `helm install` would create for the operator's identity: ServiceAccount, roles, bindings, peering."""
    keep = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "KopfPeering", "ClusterKopfPeering"}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([d for d in docs if d["kind"] in keep]))


def delete_cluster_scoped(cluster, docs: list[dict]) -> None:
    for d in docs:
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False)


# kopf's optional scans, which it gives up (falls back to the namespaces it was told and to the
# resources found at startup) when forbidden; the chart does not grant them: see templates/rbac.yaml.
KOPF_OPTIONAL_SCANS = tuple(f'cannot {verb} resource "{res}"'
                            for verb in ("list", "watch") for res in ("namespaces", "customresourcedefinitions"))


def unexpected_forbidden(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if ("Forbidden" in line or "(403)" in line) and not any(scan in line for scan in KOPF_OPTIONAL_SCANS)]


def chart_operator(cluster, docs: list[dict], watched: str, log: Path, pod_id: str = "ao-operator-0") -> Operator:
    """`alignctl operator` as the chart's pod runs it: its env, its ServiceAccount's token."""
    deployment = by_kind(docs, "Deployment")[0]
    env = {k: v for k, v in env_of(deployment).items()
           if k not in ("ALIGNMENT_METRICS_PORT", "ALIGNMENT_NAMESPACES") and v is not None}
    env["POD_ID"] = pod_id  # the chart takes it from metadata.name
    # Replicas on one host: each its own progress port; the chart's TLS Secret is not mounted here.
    env["ALIGNMENT_PROGRESS_PORT"] = str(free_port())
    env.pop("ALIGNMENT_PROGRESS_TLS_DIR", None)
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = cluster.as_service_account(deployment["metadata"]["namespace"], sa)
    return Operator(kubeconfig, watched, log, extra_env=env)


def drive_to_succeeded(cluster, api, ns: str) -> dict:
    apply_tiny(cluster, ns)
    play_tiny_stages(api, ns)
    return wait_phase(api, ns, "Succeeded")


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_operator_under_the_charts_rbac_drives_a_run_to_succeeded(cluster, chart_crds, helm, namespace, mode, tmp_path):
    ns, api = namespace, cluster.api_client()
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    docs = render(helm, ns, {"watchNamespaces": [ns]} if mode == "namespaced" else None, tmp_path)
    install_rbac(cluster, docs)
    op = chart_operator(cluster, docs, ns if mode == "namespaced" else "", tmp_path / "operator.log")
    try:
        op.start()
        run = drive_to_succeeded(cluster, api, ns)
        assert run["status"]["progress"] == "3/3" and run["status"]["model"] == "/workspace/x/tiny/dpo/final"
        reasons = [e.reason for e in client.CoreV1Api(api).list_namespaced_event(
            ns, field_selector="involvedObject.kind=AlignmentRun").items]
        assert "RunSucceeded" in reasons, "events need `create events`"
        assert "alignment_reconcile_errors_total 0.0" in op.metrics()
        # the operator took part in peering: its keep-alive is in the peering object
        kind, where = ("kopfpeering", ["-n", ns]) if mode == "namespaced" else ("clusterkopfpeering", [])
        peering = yaml.safe_load(cluster.kubectl("get", kind, RELEASE, *where, "-o", "yaml").stdout)
        assert "ao-operator-0" in peering.get("status", {}), peering
    finally:
        op.stop()
        delete_cluster_scoped(cluster, docs)
    forbidden = unexpected_forbidden((tmp_path / "operator.log").read_text())
    assert not forbidden, forbidden[:5]


def test_one_rule_less_and_the_run_gets_no_job(cluster, chart_crds, helm, namespace, tmp_path):
    ns, api = namespace, cluster.api_client()
    docs = render(helm, ns, {"watchNamespaces": [ns]}, tmp_path)
    crippled = copy.deepcopy(docs)
    role = by_kind(crippled, "Role")[0]
    rule = next(r for r in role["rules"] if r["resources"] == ["jobs"])
    rule["verbs"].remove("create")
    install_rbac(cluster, crippled)
    sa = f"system:serviceaccount:{ns}:{by_kind(docs, 'ServiceAccount')[0]['metadata']['name']}"
    can = lambda *a: cluster.kubectl("auth", "can-i", *a, "-n", ns, "--as", sa, check=False).stdout.strip()  # noqa: E731
    assert can("create", "jobs.batch") == "no" and can("patch", "jobs.batch") == "yes"
    op = chart_operator(cluster, crippled, ns, tmp_path / "operator.log")
    try:
        op.start()
        apply_tiny(cluster, ns)
        log = tmp_path / "operator.log"
        wait_for("a 403 in the operator log", lambda: "Forbidden" in log.read_text() and "jobs" in log.read_text(),
                 timeout=60)
        assert "403" in log.read_text()
        time.sleep(2)
        assert SFT not in jobs(api, ns), "without `create jobs` the run gets no Job"
        assert 'cannot create resource \\"jobs\\"' in log.read_text() or 'cannot create resource "jobs"' in log.read_text()
    finally:
        op.stop()
        delete_cluster_scoped(cluster, crippled)


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_the_service_account_reads_no_secret_and_nothing_unlisted(cluster, chart_crds, helm, namespace, mode, tmp_path):
    """Namespaced with the defaults (the run's Secrets' key names: get by name, never list or watch);
    cluster-wide with rbac.checkSecrets false (no Secret of a run at all)."""
    ns = namespace
    docs = render(helm, ns, {"watchNamespaces": [ns]} if mode == "namespaced" else {"rbac": {"checkSecrets": False}},
                  tmp_path)
    gets = "yes" if mode == "namespaced" else "no"
    install_rbac(cluster, docs)
    sa = f"system:serviceaccount:{ns}:{by_kind(docs, 'ServiceAccount')[0]['metadata']['name']}"
    try:
        def can(*args: str) -> str:
            return cluster.kubectl("auth", "can-i", *args, "--as", sa, check=False).stdout.strip()

        for verb in ("list", "watch"):
            assert can(verb, "secrets", "-n", ns) == "no"
            assert can(verb, "secrets", "-A") == "no"
        assert can("get", "secrets/judge-api-key", "-n", ns) == gets
        assert can("get", "secrets/judge-api-key", "-n", "default") == "no"  # namespaced: only where it watches
        assert can("create", "pods", "-n", ns) == "no"            # the Job controller makes pods, not the operator
        assert can("delete", "persistentvolumeclaims", "-n", ns) == "no"  # checkpoints outlive runs
        assert can("patch", "alignmentruns.alignment.dev", "-n", ns) == "no"  # only the status subresource
        assert can("update", "alignmentruns.alignment.dev", "--subresource=status", "-n", ns) == "yes"
        assert can("patch", "alignmentruns.alignment.dev", "--subresource=status", "-n", ns) == "yes"  # progress
        assert can("create", "tokenreviews.authentication.k8s.io") == "yes"  # the progress endpoint's check
        assert can("create", "jobs.batch", "-n", ns) == "yes"
        assert can("get", "customresourcedefinitions.apiextensions.k8s.io/pytorchjobs.kubeflow.org") == "yes"
        assert can("get", "customresourcedefinitions.apiextensions.k8s.io/jobsets.jobset.x-k8s.io") == "yes"
        assert can("get", "customresourcedefinitions.apiextensions.k8s.io/alignmentruns.alignment.dev") == "no"
        other = "default"
        assert can("create", "jobs.batch", "-n", other) == ("no" if mode == "namespaced" else "yes")
        listed = cluster.kubectl("auth", "can-i", "--list", "-n", ns, "--as", sa).stdout.splitlines()[1:]
        rows = [line.split() for line in listed if line.strip() and not line.lstrip().startswith("[")]
        resources = {row[0]: row[-1] for row in rows}  # resource -> "[verbs]" (non-resource URL rows skipped)
        assert "jobs.batch" in resources and "alignmentruns.alignment.dev/status" in resources, listed
        # The one Secret it may read: the installation's progress CA, by name, in the release namespace.
        assert can("get", "secrets/ao-alignment-operator-progress-tls", "-n", ns) == "yes"
        for row in rows:
            assert "*" not in row[0] + row[-1], row
            assert row[0].split(".")[0] != "secrets" or row[-1] == "[create]" or (
                "[ao-alignment-operator-progress-tls]" in row) or (  # with the run's Secrets' `get`, merged
                gets == "yes" and set(" ".join(row).rsplit("[", 1)[1].strip("]").split()) <= {"get", "create"}), row
    finally:
        delete_cluster_scoped(cluster, docs)


def test_two_replicas_peer_and_exactly_one_acts(cluster, chart_crds, helm, namespace, tmp_path):
    ns, api = namespace, cluster.api_client()
    docs = render(helm, ns, {"watchNamespaces": [ns], "replicaCount": 2,
                             "progress": {"enabled": True, "port": 8443, "tlsSecretName": "ao-progress-tls"}}, tmp_path)
    install_rbac(cluster, docs)
    logs = [tmp_path / "replica-0.log", tmp_path / "replica-1.log"]
    ops = [chart_operator(cluster, docs, ns, logs[i], pod_id=f"ao-operator-{i}") for i in range(2)]
    try:
        for op in ops:
            op.start()
        wait_for("both replicas in the KopfPeering", lambda: len(yaml.safe_load(cluster.kubectl(
            "get", "kopfpeering", RELEASE, "-n", ns, "-o", "yaml").stdout).get("status") or {}) == 2, timeout=60)
        time.sleep(2)  # let the lower-priority replica pause
        apply_tiny(cluster, ns)
        wait_for("the sft Job", lambda: SFT in jobs(api, ns), timeout=20)
        creators = [log for log in logs if "created Job" in log.read_text()]
        assert len(creators) == 1, [log.read_text()[-2000:] for log in logs]
    finally:
        for op in ops:
            op.stop()
        delete_cluster_scoped(cluster, docs)


def test_zephyr_run_without_its_secrets_says_so_at_once_and_starts_once_created(cluster, chart_crds, helm, namespace,
                                                                                 tmp_path):
    """examples/zephyr-run.yaml (its hfTokenSecretRef uncommented, as the README says) applied before the
    Secrets it names, under the chart's RBAC: admitted, and its first status says what is missing (each
    Secret and key, the stages that read them, the command), Pending, no Job; once the README's two
    `kubectl create secret` ran, sft starts. No Secret value anywhere in status, Events or the log."""
    ns, api = namespace, cluster.api_client()
    docs = render(helm, ns, {"watchNamespaces": [ns]}, tmp_path)
    install_rbac(cluster, docs)
    op = chart_operator(cluster, docs, ns, tmp_path / "operator.log")
    text = (ROOT / "examples" / "zephyr-run.yaml").read_text()
    assert "    # hfTokenSecretRef: {name: hf-token, key: token}" in text
    try:
        op.start()
        applied = time.monotonic()
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=text.replace("# hfTokenSecretRef:", "hfTokenSecretRef:"))
        first = wait_for("the run's first status", lambda: get_run(api, ns, "zephyr-7b-beta").get("status"), timeout=30)
        print(f"first status {time.monotonic() - applied:.1f}s after kubectl apply: {first['phase']}")
        assert first["phase"] == "Pending" and not jobs(api, ns), first
        stages = {s["name"]: s for s in first["stages"]}
        assert stages["eval"]["reason"] == "SecretMissing", stages["eval"]
        assert "Secret judge-api-key (env JUDGE_API_KEY, key api-key) is not in namespace " + ns in stages["eval"]["message"]
        for secret, key in (("judge-api-key", "api-key"), ("hf-token", "token")):
            assert f"kubectl create secret generic {secret} -n {ns} --from-literal={key}=..." in stages["sft"]["message"]
        reconciling = next(c for c in first["conditions"] if c["type"] == "Reconciling")
        assert reconciling["reason"] == "SecretMissing" and "judge-api-key" in reconciling["message"], reconciling
        assert "SecretMissing" in [e.reason for e in client.CoreV1Api(api).list_namespaced_event(ns).items]

        for secret, key in (("judge-api-key", "api-key"), ("hf-token", "token")):  # README's "On a cluster"
            cluster.kubectl("create", "secret", "generic", secret, f"--from-literal={key}=value-{secret}-x7q", "-n", ns)
        sft = child("zephyr-7b-beta", "sft")
        wait_for("the sft Job once the Secrets exist", lambda: sft in jobs(api, ns), timeout=45)
        run = wait_for("sft Running", lambda: (r := get_run(api, ns, "zephyr-7b-beta"))["status"]["phase"] == "Running"
                       and r, timeout=20)
        assert [s.get("reason") for s in run["status"]["stages"]] == [None, None, None], run["status"]["stages"]
    finally:
        op.stop()
        delete_cluster_scoped(cluster, docs)
    said = [yaml.safe_dump(run), (tmp_path / "operator.log").read_text(),
            " ".join(e.message or "" for e in client.CoreV1Api(api).list_namespaced_event(ns).items)]
    assert not [s for s in said if "value-judge-api-key-x7q" in s or "value-hf-token-x7q" in s]
    forbidden = unexpected_forbidden((tmp_path / "operator.log").read_text())
    assert not forbidden, forbidden[:5]
