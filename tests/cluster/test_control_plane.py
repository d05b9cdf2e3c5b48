"""The test control plane behaves like a real cluster: version, RBAC, the Job controller
and the garbage collector, so operator tests can rely on them."""

from __future__ import annotations

import json

import pytest

from controlplane import k8s_version, wait_for

pytestmark = pytest.mark.cluster


def get_json(cluster, *args):
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_server_reports_the_pinned_release(cluster):
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"] == k8s_version()
    assert f"v{version['major']}.{version['minor']}" == k8s_version().rsplit(".", 1)[0]


def test_api_client_talks_to_the_cluster(cluster, namespace):
    from kubernetes import client

    with cluster.api_client() as api:
        names = [ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items]
    assert namespace in names


def test_service_account_is_bound_by_rbac(cluster, namespace):
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=a=1")
    as_reader = cluster.as_service_account(namespace, "reader")

    denied = cluster.kubectl("get", "configmaps", "-n", namespace, kubeconfig=as_reader, check=False)
    assert denied.returncode != 0
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr
    assert "forbidden" in denied.stderr.lower()

    cluster.kubectl("create", "role", "read-configmaps", "-n", namespace, "--verb=get,list", "--resource=configmaps")
    cluster.kubectl("create", "rolebinding", "reader", "-n", namespace, "--role=read-configmaps",
                    f"--serviceaccount={namespace}:reader")
    # RBAC changes reach the authorizer's cache within moments.
    allowed = wait_for("the RoleBinding to take effect",
                       lambda: _succeeds(cluster, as_reader, "get", "configmaps", "-n", namespace, "-o", "name"))
    assert "configmap/settings" in allowed.stdout
    # Still nothing beyond the Role: no writes, no other namespaces.
    assert not _succeeds(cluster, as_reader, "delete", "configmap", "settings", "-n", namespace)
    assert not _succeeds(cluster, as_reader, "get", "configmaps", "-n", "default")


def _succeeds(cluster, kubeconfig, *args):
    result = cluster.kubectl(*args, kubeconfig=kubeconfig, check=False)
    return result if result.returncode == 0 else None


JOB = """
apiVersion: batch/v1
kind: Job
metadata:
  name: train
spec:
  parallelism: 2
  completions: 2
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: trainer
        image: registry.invalid/trainer:never-pulled
        command: ["true"]
"""


def job_pods(cluster, namespace):
    return get_json(cluster, "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=train")["items"]


def test_job_controller_creates_pods_and_deleting_the_job_collects_them(cluster, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=JOB)
    job = get_json(cluster, "job", "train", "-n", namespace)

    pods = wait_for("the Job controller to create 2 pods",
                    lambda: len(job_pods(cluster, namespace)) == 2 and job_pods(cluster, namespace))
    for pod in pods:
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "train", job["metadata"]["uid"])
        assert pod["status"]["phase"] == "Pending"  # no kubelet and no scheduler here
    wait_for("the Job's status to count 2 active pods",
             lambda: get_json(cluster, "job", "train", "-n", namespace).get("status", {}).get("active") == 2)

    cluster.kubectl("delete", "job", "train", "-n", namespace, "--cascade=background")
    wait_for("the garbage collector to delete the pods", lambda: not job_pods(cluster, namespace))


def test_garbage_collector_deletes_what_an_owner_leaves_behind(cluster, namespace):
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = get_json(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "child",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}],
        },
        "stringData": {"token": "x"},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(child))
    cluster.kubectl("create", "configmap", "bystander", "-n", namespace)

    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=background")
    wait_for("the garbage collector to delete the owned Secret",
             lambda: cluster.kubectl("get", "secret", "child", "-n", namespace, check=False).returncode != 0)
    # An object without the ownerReference survives.
    cluster.kubectl("get", "configmap", "bystander", "-n", namespace)


def test_helm_installs_and_uninstalls_a_chart(cluster, namespace, tmp_path):
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: hello\nversion: 0.1.0\n")
    (chart / "templates/cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    cluster.helm("install", "hi", str(chart), "-n", namespace, "--set", "greeting=hello", "--wait")
    data = get_json(cluster, "configmap", "hi-greeting", "-n", namespace)["data"]
    assert data == {"greeting": "hello"}

    cluster.helm("uninstall", "hi", "-n", namespace, "--wait")
    assert cluster.kubectl("get", "configmap", "hi-greeting", "-n", namespace, check=False).returncode != 0
