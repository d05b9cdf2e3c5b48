"""Fixtures for tests that need a real control plane (`@pytest.mark.cluster`).

- `cluster` (session): etcd + kube-apiserver + kube-controller-manager from tools/k8s/build.sh;
  a ControlPlane with .kubeconfig, .server, .kubectl(), .api_client(), .as_service_account().
- `crds` (session): the AlignmentRun CRD (crds/alignmentrun.yaml) and Kubeflow's PyTorchJob
  CRD (from the training operator's module, tools/k8s/build.sh) installed and Established.
- `namespace` (function): a fresh namespace, deleted after the test.

Missing binaries FAIL the tests with the command to build them; ALIGNMENT_SKIP_CLUSTER=1
skips them instead (for a machine that cannot build Kubernetes).
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest

import engines
from controlplane import BUILD_COMMAND, REPO, ControlPlane, StartupError, binaries_dir, missing_binaries, wait_for
from operator_process import Operator
from realnode import STOP_AFTER_LAST_USER, real, restricted_ns  # noqa: F401 - the one real node every `node` test shares

CRD_FILE = REPO / "crds/alignmentrun.yaml"


def pytest_collection_modifyitems(items):
    """The engines' tests after the other node tests: they install JobSet, the training operator and
    Kueue (webhooks on every Job) on the shared real node, and the other node tests must not run
    beside them."""
    items.sort(key=lambda item: item.path.name == "test_engines_real_node.py")  # stable: order kept


def pytest_configure(config):
    # pyproject.toml registers the marker; this keeps --strict-markers happy without it.
    if not any(line.startswith("cluster:") for line in config.getini("markers")):
        config.addinivalue_line("markers", "cluster: needs the control plane built by tools/k8s/build.sh")
    # Registered here, not in pyproject.toml: the trainer image reads pyproject.toml (its trainer extra),
    # so any edit there rebuilds the image's 3 GB dependency layer.
    config.addinivalue_line("markers", "waits: spends most of its wall time waiting (a fault window held open), "
                                       "not computing: scripts/test runs these in a pytest process of their own")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.environ.get("ALIGNMENT_SKIP_CLUSTER") == "1":
        pytest.skip("ALIGNMENT_SKIP_CLUSTER=1")
    bin_dir = binaries_dir()
    missing = missing_binaries(bin_dir)
    if missing:
        pytest.fail(
            f"control-plane binaries missing in {bin_dir}: {', '.join(missing)}.\n"
            f"Build them with `{BUILD_COMMAND}` (or set ALIGNMENT_SKIP_CLUSTER=1 to skip these tests).",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("cluster")  # logs stay here after the session
    started = time.monotonic()
    try:
        plane = ControlPlane.start(bin_dir, workdir)
    except StartupError as exc:
        failure = str(exc)  # failed outside the except block: no chained traceback noise
    else:
        failure = None
    if failure:
        pytest.fail(failure, pytrace=False)
    print(f"\ncontrol plane ready at {plane.server} in {time.monotonic() - started:.1f}s (logs: {workdir})")
    STOP_AFTER_LAST_USER["cluster"] = plane.stop  # idempotent
    yield plane
    plane.stop()


# A shared control plane (`cluster`) or real node (`real`) stops once the last test that uses it is
# done, not at the session's end: idle, their etcd, kube-apiserver, controllers, kubelet and containerd
# still take CPU, and on 2 cores the tests that follow in the same process, or the other process's
# beside them, ran that much slower for nothing.
@pytest.hookimpl(trylast=True)  # after pytest's own teardown of this test's fixtures (the operator, the namespace)
def pytest_runtest_teardown(item, nextitem):
    for name in list(STOP_AFTER_LAST_USER):
        if item is _last_user(item.session, name):
            STOP_AFTER_LAST_USER.pop(name)()


def _last_user(session, fixture: str):
    """The session's last test whose fixtures include `fixture` (directly or through another)."""
    cache = session.__dict__.setdefault("_last_users", {})
    if fixture not in cache:
        users = [item for item in session.items if fixture in item.fixturenames]
        cache[fixture] = users[-1] if users else None
    return cache[fixture]


@pytest.fixture(scope="session")
def crds(cluster):
    """Installs the CRDs (server-side apply: the PyTorchJob CRD is too big for the
    last-applied annotation) and waits until the API server serves them."""
    if not CRD_FILE.exists():
        pytest.fail(f"{CRD_FILE} is missing (generate it with `alignctl crd > crds/alignmentrun.yaml`)")
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("apply", "--server-side", "-f", "-", input=engines.crd("training-operator", "pytorchjobs.kubeflow.org"))
    names = ["alignmentruns.alignment.dev", "pytorchjobs.kubeflow.org"]
    for name in names:
        cluster.wait_established(name)
    return names


@pytest.fixture
def namespace(cluster, request):
    """A fresh namespace named after the test, with its default ServiceAccount in place
    (Pods cannot be created before the controller manager has made it)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(f"the default ServiceAccount in namespace {name}", timeout=30,
             fn=lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(cluster, crds, namespace, tmp_path):
    """An operator process watching `namespace`; a file that needs other settings (live progress, a
    restricted namespace) defines its own."""
    op = Operator(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
    yield op
    op.stop()
