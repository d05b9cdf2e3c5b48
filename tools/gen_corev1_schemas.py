#!/usr/bin/env python3
"""Write operator/alignment_operator/api/corev1.json: the core/v1 shapes an AlignmentRun passes
into its pods (EnvVar, EnvFromSource, Toleration, Affinity and what they reference), copied from
Kubernetes' own OpenAPI v3 document, so the CRD carries their real schemas.

    python tools/gen_corev1_schemas.py                 # from the Go module cache (tools/k8s/go.mod's version)
    python tools/gen_corev1_schemas.py FILE_OR_URL     # api__v1_openapi.json, or an API server's /openapi/v3/api/v1

The copy keeps types, required fields, list/map types and each field's first sentence of
description; `alignment_operator.api.corev1` adds the API server's validation rules as CEL.
tests/cluster/test_crd_server.py regenerates it from the test API server and fails on drift.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "operator" / "alignment_operator" / "api" / "corev1.json"
ROOTS = ["io.k8s.api.core.v1.EnvVar", "io.k8s.api.core.v1.EnvFromSource", "io.k8s.api.core.v1.Toleration",
         "io.k8s.api.core.v1.Affinity"]
KEEP = {"type", "properties", "items", "additionalProperties", "required", "format", "description",
        "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "$ref",
        "x-kubernetes-int-or-string"}


def kubernetes_version() -> str:
    text = (ROOT / "tools" / "k8s" / "go.mod").read_text()
    return re.search(r"k8s\.io/kubernetes (v[0-9.]+)", text).group(1)


def default_source() -> str:
    cache = subprocess.run(["go", "env", "GOMODCACHE"], check=True, capture_output=True, text=True).stdout.strip()
    return f"{cache}/k8s.io/kubernetes@{kubernetes_version()}/api/openapi-spec/v3/api__v1_openapi.json"


def load(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source) as response:  # the test API server (plain or with a CA set up)
            return json.load(response)
    return json.loads(Path(source).read_text())


def short(ref: str) -> str:
    return ref.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?\.)(\s|$)", text)
    return match.group(1) if match else text


def clean(node: dict) -> dict:
    """One schema node: `allOf: [{$ref}]` becomes `$ref`, defaults go (the CRD must not default
    core/v1 fields the API server defaults later in the pod), descriptions shrink."""
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
    out = {}
    for key, value in node.items():
        if key not in KEEP:
            continue
        if key == "$ref":
            value = short(value)
        elif key == "description":
            value = first_sentence(value)
        elif key == "properties":
            value = {name: clean(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = clean(value)
        out[key] = value
    return out


def collect(schemas: dict) -> dict:
    out: dict[str, dict] = {}
    todo = list(ROOTS)
    while todo:
        full = todo.pop()
        name = short(full)
        if name in out:
            continue
        node = clean(schemas[full])
        out[name] = node
        text = json.dumps(schemas[full])
        todo += re.findall(r'"#/components/schemas/([^"]+)"', text)
    return dict(sorted(out.items()))


def generate(source: str, label: str) -> str:
    doc = load(source)
    body = {"source": label, "schemas": collect(doc["components"]["schemas"])}
    return json.dumps(body, indent=1, sort_keys=True) + "\n"  # key order differs between the file and a server


def main(argv: list[str]) -> int:
    source = argv[0] if argv else default_source()
    OUT.write_text(generate(source, f"Kubernetes {kubernetes_version()} OpenAPI v3 /openapi/v3/api/v1"))
    print(f"wrote {OUT.relative_to(ROOT)} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
