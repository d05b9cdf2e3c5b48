"""The chart's aggregated ClusterRoles on the real API server: a user bound to the namespace's
default `edit` role can create an AlignmentRun, one bound to `view` can read it but not create,
change or delete one (kube-controller-manager's clusterrole-aggregation controller folds the
chart's rules into Kubernetes' own roles, as on any cluster)."""

from __future__ import annotations

import yaml

from kubelet import wait_for
from test_chart import ROOT, by_kind, chart_crds, helm, render  # noqa: F401 - chart_crds, helm: fixtures

import pytest

pytestmark = pytest.mark.cluster


def test_the_roles_render_only_when_asked(helm, tmp_path):
    names = lambda docs: sorted(d["metadata"]["name"] for d in by_kind(docs, "ClusterRole"))  # noqa: E731
    roles = names(render(helm, "ops"))
    assert {"ops-ao-alignment-operator-edit", "ops-ao-alignment-operator-view"} <= set(roles)
    without = names(render(helm, "ops", {"rbac": {"create": True, "aggregateToDefaultRoles": False}}, tmp_path))
    assert not [r for r in without if r.endswith(("-edit", "-view"))]


def test_a_namespace_editor_can_create_a_run_and_a_viewer_cannot(cluster, chart_crds, helm, namespace):
    ns = namespace
    roles = [d for d in by_kind(render(helm, "alignment-system"), "ClusterRole")
             if d["metadata"]["name"].endswith(("-edit", "-view"))]
    assert sorted(r["metadata"]["labels"].get("rbac.authorization.k8s.io/aggregate-to-edit", "-") for r in roles) == ["-", "true"]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(roles))
    try:
        # Bind the users to Kubernetes' own default roles, as a namespace owner would.
        cluster.kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice", "-n", ns)
        cluster.kubectl("create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob", "-n", ns)

        def can(user, *what):
            return cluster.kubectl("auth", "can-i", *what, "-n", ns, "--as", user, check=False).stdout.strip()

        wait_for("edit and view aggregate the chart's rules",
                 lambda: can("alice", "create", "alignmentruns.alignment.dev") == "yes"
                 and can("bob", "list", "alignmentruns.alignment.dev") == "yes", timeout=60)

        run = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
        run["metadata"] = {"name": "by-alice", "namespace": ns}
        created = cluster.kubectl("create", "-f", "-", "--as", "alice", input=yaml.safe_dump(run), check=False)
        assert created.returncode == 0, created.stderr
        assert cluster.kubectl("get", "alignmentrun", "by-alice", "-n", ns, "--as", "bob",
                               "-o", "jsonpath={.metadata.name}").stdout == "by-alice"

        run["metadata"]["name"] = "by-bob"
        refused = cluster.kubectl("create", "-f", "-", "--as", "bob", input=yaml.safe_dump(run), check=False)
        assert refused.returncode != 0
        assert ('User "bob" cannot create resource "alignmentruns" in API group "alignment.dev" in the namespace '
                f'"{ns}"') in refused.stderr
        assert can("bob", "patch", "alignmentruns.alignment.dev") == "no"
        assert can("bob", "delete", "alignmentruns.alignment.dev") == "no"
        assert can("alice", "delete", "alignmentruns.alignment.dev") == "yes"
        # Status is the operator's: neither user may write it.
        assert can("alice", "patch", "alignmentruns.alignment.dev", "--subresource=status") == "no"
        # Bindings are per namespace: alice has nothing elsewhere.
        assert cluster.kubectl("auth", "can-i", "create", "alignmentruns.alignment.dev", "-n", "default",
                               "--as", "alice", check=False).stdout.strip() == "no"
    finally:
        cluster.kubectl("delete", "alignmentrun", "by-alice", "-n", ns, "--ignore-not-found", "--wait=false",
                        check=False)
        for r in roles:
            cluster.kubectl("delete", "clusterrole", r["metadata"]["name"], "--ignore-not-found", check=False)
