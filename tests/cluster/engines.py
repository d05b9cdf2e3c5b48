"""The distributed-training engines on the real node, installed as their projects publish them.

tools/k8s/build.sh builds each controller from its own Go module and renders that module's
kustomization (CRDs, RBAC, webhook configurations, Service, Deployment) into <name>.yaml beside
the binary; scripts/build-images puts the binary in an image. `install` applies those manifests
as they are, changing only what a cluster without a registry needs (the image, never pulled),
what a 2-core node can schedule (no CPU request), and the configuration an admin would set:

- jobset: nothing else.
- training-operator: its PyTorch init container (it waits for the master's DNS name) gets a
  template that passes the `restricted` Pod Security level (the built-in one has no
  securityContext, so every worker pod of a PyTorchJob is refused in a restricted namespace) and
  the local busybox image. (Its `nslookup` also fails when any search domain answers NXDOMAIN,
  as Debian's busybox does even after the pod's own namespace resolved: the template looks for
  an answer instead.)
- kueue: only the batch/job integration, and only the webhooks of what it then serves (its
  manifests register webhooks for every framework with failurePolicy Fail; a webhook whose
  handler is not served would refuse every pod in the cluster).

The controllers run as pods on the node under their own ServiceAccounts, their webhook
certificates made by their own cert rotation; `install` returns once their webhooks answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import yaml

from controlplane import ControlPlane, binaries_dir, wait_for


@dataclass(frozen=True)
class Engine:
    name: str
    namespace: str
    deployment: str
    crds: tuple[str, ...]
    webhooks: tuple[str, ...]  # webhook configurations the cert rotation injects its CA into


ENGINES = {
    "jobset": Engine("jobset", "jobset-system", "jobset-controller-manager", ("jobsets.jobset.x-k8s.io",),
                     ("jobset-mutating-webhook-configuration", "jobset-validating-webhook-configuration")),
    "training-operator": Engine("training-operator", "kubeflow", "training-operator", ("pytorchjobs.kubeflow.org",),
                                ("validator.training-operator.kubeflow.org",)),
    "kueue": Engine("kueue", "kueue-system", "kueue-controller-manager",
                    ("clusterqueues.kueue.x-k8s.io", "localqueues.kueue.x-k8s.io", "resourceflavors.kueue.x-k8s.io",
                     "workloads.kueue.x-k8s.io"),
                    ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")),
}

# Kueue serves the webhooks of its own kinds and of the integrations it runs; these paths are those.
KUEUE_WEBHOOK_PATHS = ("-kueue-x-k8s-io-", "-batch-v1-job")
INIT_TEMPLATE_MOUNT = "/etc/training-operator"
PYTORCH_INIT_TEMPLATE = """\
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits: {cpu: 100m, memory: 20Mi}
    requests: {cpu: 10m, memory: 10Mi}
  securityContext:
    allowPrivilegeEscalation: false
    capabilities: {drop: [ALL]}
    runAsNonRoot: true
    seccompProfile: {type: RuntimeDefault}
  command: ['/bin/busybox', 'sh', '-c', 'for i in $(/bin/busybox seq {{.MaxTries}}); do /bin/busybox nslookup {{.MasterAddr}} | /bin/busybox grep -q "^Name:" && exit 0; echo waiting for master; /bin/busybox sleep 2; done; exit 1']
"""


def published(name: str) -> list[dict]:
    """Engine `name`'s manifests as build.sh rendered them from its module."""
    path = binaries_dir() / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: tools/k8s/build.sh renders it")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests(engine: Engine) -> list[dict]:
    """The engine's published manifests, with the changes the module doc lists."""
    from node import image_ref  # (node.py needs nothing of a cluster test that only reads CRDs)

    out = []
    for doc in published(engine.name):
        kind = doc["kind"]
        if kind == "APIService":  # Kueue's visibility API: an aggregated API nothing here reads
            continue
        if kind == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            container = spec["containers"][0]
            container["image"] = image_ref(engine.name)
            container["imagePullPolicy"] = "Never"
            # No CPU request: the two-pod stages ask a core each of the node's two.
            container["resources"] = {"requests": {"memory": "64Mi"}, "limits": {"memory": "1Gi"}}
            if engine.name == "training-operator":
                container.setdefault("args", []).extend([
                    f"--pytorch-init-container-image={image_ref('pause')}",
                    f"--pytorch-init-container-template-file={INIT_TEMPLATE_MOUNT}/init.yaml"])
                container.setdefault("volumeMounts", []).append({"name": "init-template", "mountPath": INIT_TEMPLATE_MOUNT})
                spec.setdefault("volumes", []).append({"name": "init-template",
                                                        "configMap": {"name": "training-operator-init-template"}})
        if kind == "ConfigMap" and engine.name == "kueue" and "controller_manager_config.yaml" in doc.get("data", {}):
            config = yaml.safe_load(doc["data"]["controller_manager_config.yaml"])
            config["integrations"] = {"frameworks": ["batch/job"]}
            doc["data"]["controller_manager_config.yaml"] = yaml.safe_dump(config)
        if kind.endswith("WebhookConfiguration") and engine.name == "kueue":
            doc["webhooks"] = [w for w in doc["webhooks"]
                               if any(p in w["clientConfig"]["service"]["path"] for p in KUEUE_WEBHOOK_PATHS)]
        out.append(doc)
    if engine.name == "training-operator":
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "training-operator-init-template", "namespace": engine.namespace},
                    "data": {"init.yaml": PYTORCH_INIT_TEMPLATE}})
    return out


def crd(engine: str, name: str) -> str:
    """One CRD of an engine, as its module publishes it (e.g. crd("jobset", "jobsets.jobset.x-k8s.io")),
    for tests that only need the schema (server-side dry runs), not the controller."""
    for doc in published(engine):
        if doc["kind"] == "CustomResourceDefinition" and doc["metadata"]["name"] == name:
            return yaml.safe_dump(doc)
    raise KeyError(f"{engine}'s manifests have no CRD {name}")


def install(plane: ControlPlane, name: str, timeout: float = 240) -> Engine:
    """Installs engine `name` and waits until its controller runs and its webhooks answer."""
    engine = ENGINES[name]
    started = time.monotonic()
    docs = manifests(engine)
    # Server-side: the CRDs are too big for kubectl's last-applied annotation.
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(docs))
    for served in engine.crds:
        plane.wait_established(served)
    try:
        plane.kubectl("rollout", "status", "-n", engine.namespace, f"deployment/{engine.deployment}",
                      f"--timeout={int(timeout)}s")
        wait_for(f"{name}'s CA in its webhook configurations", timeout=60, fn=lambda: all(
            _ca_injected(plane, webhook) for webhook in engine.webhooks))
    except Exception as exc:
        pods = plane.kubectl("get", "pods", "-n", engine.namespace, "-o", "wide", check=False).stdout
        logs = plane.kubectl("logs", "-n", engine.namespace, f"deployment/{engine.deployment}", "--tail=40",
                             check=False)
        raise AssertionError(f"{name} did not come up: {exc}\npods:\n{pods}\nlog:\n{logs.stdout}{logs.stderr}") from None
    print(f"\n{name} installed and serving its webhooks in {time.monotonic() - started:.0f}s")
    return engine


def _ca_injected(plane: ControlPlane, webhook: str) -> bool:
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        got = plane.kubectl("get", kind, webhook, "-o", "json", check=False)
        if got.returncode == 0:
            hooks = json.loads(got.stdout).get("webhooks") or []
            return bool(hooks) and all(h["clientConfig"].get("caBundle") for h in hooks)
    return False

