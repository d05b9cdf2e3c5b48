"""The Helm chart's hand-kept parts against their sources of truth, without helm or a cluster.

tests/cluster/test_chart.py renders the chart with helm and runs the operator under its RBAC.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "alignment-operator"


def test_chart_crd_is_a_byte_for_byte_copy_of_the_generated_one():
    assert (CHART / "crds" / "alignmentrun.yaml").read_bytes() == (ROOT / "crds" / "alignmentrun.yaml").read_bytes(), (
        "charts/alignment-operator/crds/alignmentrun.yaml drifted from crds/alignmentrun.yaml: "
        "run `cp crds/alignmentrun.yaml charts/alignment-operator/crds/`")


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == version, "image tags default to appVersion: bump both together"


def test_peering_crds_are_the_ones_kopf_looks_for():
    from kopf._cogs.structs import references  # where kopf names the peering resources it watches

    crds = {d["spec"]["names"]["plural"]: d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d}
    for selector, scope in ((references.CLUSTER_PEERINGS_K, "Cluster"), (references.NAMESPACED_PEERINGS_K, "Namespaced")):
        crd = crds[selector.any_name]
        assert crd["metadata"]["name"] == f"{selector.any_name}.{selector.group}"
        assert crd["spec"]["group"] == selector.group and crd["spec"]["scope"] == scope
        assert [v["name"] for v in crd["spec"]["versions"]] == [selector.version]


def _schema_paths(schema: dict, defs: dict, prefix: str = "") -> set[str]:
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    out = set()
    for key, sub in schema.get("properties", {}).items():
        out.add(prefix + key)
        out |= _schema_paths(sub, defs, f"{prefix}{key}.")
    return out


def _value_paths(values: dict, schema_paths: set[str], prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        out.add(prefix + key)
        # descend only where the schema describes the keys (not into free-form maps like resources.limits)
        if isinstance(value, dict) and any(p.startswith(f"{prefix}{key}.") for p in schema_paths):
            out |= _value_paths(value, schema_paths, f"{prefix}{key}.")
    return out


def test_every_value_is_described_by_the_schema_and_the_schema_is_strict():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = _schema_paths(schema, schema["definitions"])
    missing = _value_paths(values, paths) - paths
    assert not missing, f"values.yaml keys without a schema entry: {sorted(missing)}"
    assert schema["additionalProperties"] is False, "a misspelt value must fail `helm install`, not be ignored"


def test_rbac_rules_name_no_wildcard_and_no_secret():
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "alignment-operator.namespacedRules" -}}\n(.*?)\{\{- end }}', text, re.S).group(1)
    rules = yaml.safe_load(block)
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    assert len(rules) >= 8
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert "secrets" not in rule["resources"], "the one Secret rule is secretKeysRule's, behind rbac.checkSecrets"
    rule_lines = [line for line in rbac.splitlines()  # the peering and CRD rules written in rbac.yaml itself
                  if re.match(r"\s*-? ?(apiGroups|resources|verbs|resourceNames):", line)]
    assert len(rule_lines) >= 10
    # The one Secret it may touch: the installation's progress CA, by name, in a Role of the release namespace.
    start = rbac.index("name: {{ $fullname }}-progress-tls")
    tls_role = rbac[start:rbac.index("---", start)]
    assert 'resourceNames: [{{ include "alignment-operator.progressTLSSecret" . }}]' in tls_role
    assert "verbs: [get, update]" in tls_role and "verbs: [create]" in tls_role
    assert rbac.count("secrets") == tls_role.count("secrets") == 2, "a Secret rule outside the progress CA's Role"
    # The run's own Secrets: get by name only (their key names, before a stage starts), and only with
    # rbac.checkSecrets; never list or watch (which would bring every Secret of the namespace).
    keys_rule = re.search(r'define "alignment-operator.secretKeysRule" -}}\n\{\{- if .Values.rbac.checkSecrets -}}\n'
                          r'(.*?)\{\{- end }}', text, re.S).group(1)
    assert yaml.safe_load(keys_rule) == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert rbac.count('include "alignment-operator.secretKeysRule"') == 2, "the Role and the ClusterRole"
    for line in rule_lines:
        assert "*" not in line, line
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # what kube.py calls, spot-checked (the cluster test proves the whole set by running the operator)
    for need in (("batch", "jobs", "create"), ("batch", "jobs", "patch"), ("alignment.dev", "alignmentruns/status", "update"),
                 ("", "events", "create"), ("", "pods", "list"), ("", "persistentvolumeclaims", "create")):
        assert need in granted, need
    for never in (("", "pods", "create"), ("", "pods", "delete"), ("alignment.dev", "alignmentruns", "patch"),
                  ("", "persistentvolumeclaims", "delete")):
        assert never not in granted, never
